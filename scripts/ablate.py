"""Run an ablation config (e.g. the quickstart): ``python -m scripts.ablate --config
configs/quickstart.py[:k=v,…] --workdir runs/quickstart``."""

from scripts import common

common.set_cpu_defaults()

import argparse  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:key=value,…]")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    common.start_distributed()
    from research import ablate, config
    ablate.run_ablation(config.load(args.config), args.workdir)


if __name__ == "__main__":
    common.run_main(main)
