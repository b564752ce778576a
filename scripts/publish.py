"""Publish a finished run: ``python -m scripts.publish --workdir RUN --output DIR``.

DIR gets the weights (an orbax checkpoint and model.safetensors), config.json, a model card
(README.md), provenance.json, train_config.py and SHA256SUMS; ``python -m scripts.verify DIR``
checks it.
"""

import argparse

from research import publish
from scripts import common


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the finished run's workdir")
    parser.add_argument("--output", required=True, help="the directory to create")
    args = parser.parse_args()
    provenance = publish.publish(args.workdir, args.output)
    print(f"published {args.output}: {provenance['architecture']}, test accuracy "
          f"{provenance['metrics']['test_accuracy']:.4f}, variables sha256 "
          f"{provenance['variables_sha256']}")


if __name__ == "__main__":
    common.run_main(main)
