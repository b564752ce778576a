"""Verify a published directory: ``python -m scripts.verify DIR [--retrain]``.

Checks every file's hash, rebuilds the model from DIR alone and re-evaluates it on the recorded
test split against the recorded metrics; ``--retrain`` also reruns the recorded training command
in a temporary workdir and compares the parameters' hash. Exits 0 only when everything holds,
else 1, naming each difference on a line.
"""

import argparse
import sys

from research import publish
from scripts import common


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a directory written by scripts.publish")
    parser.add_argument("--retrain", action="store_true",
                        help="also train again with the recorded command (as long as the run)")
    args = parser.parse_args()
    report = publish.verify(args.directory, retrain=args.retrain)
    for line in report.held:
        print(f"ok: {line}")
    for line in report.problems:
        print(f"differs: {line}", file=sys.stderr)
    if report.problems:
        sys.exit(1)
    print(f"verified {args.directory}")


if __name__ == "__main__":
    common.run_main(main)
