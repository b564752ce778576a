"""Export a training run's train and eval steps for deployment (``jax.export``):

    python -m scripts.export --workdir runs/r50_cifar [--platforms cuda,tpu,cpu]

writes ``runs/r50_cifar/export/``: ``eval.<platform>.bin`` and ``train.<platform>.bin`` (one
serialized ``jax.export`` module each), ``variables.safetensors`` (the eval step's input) and
``train_state.safetensors`` (the train step's), both flat ``{path: array}``, and
``export.json`` (batch sizes, image shape, model, preprocessing). Any JAX process on that
platform runs them, without this code (``research.export`` documents the calls)::

    from jax import export
    from safetensors.numpy import load_file
    step = export.deserialize(bytearray(open("export/eval.cuda.bin", "rb").read()))
    metrics = step.call(load_file("export/variables.safetensors"), images, labels, mask)

The run's dataset must be readable (for its shapes); the steps are those of one device.
"""

import argparse

from research import export
from scripts import common


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training run's workdir")
    parser.add_argument("--platforms", default="cuda,tpu,cpu",
                        help=f"comma-separated, of {','.join(export.PLATFORMS)}")
    args = parser.parse_args()
    platforms = [p for p in args.platforms.split(",") if p]
    export.check_platforms(platforms)
    exp, state = export.from_run(args.workdir)
    written = export.write(args.workdir, exp, state, platforms)
    print(f"wrote {len(written)} files to {written[0].parent} (step {int(state.step)})")


if __name__ == "__main__":
    common.run_main(main)
