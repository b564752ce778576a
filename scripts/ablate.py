"""Run an ablation config (e.g. the quickstart): ``python -m scripts.ablate --config
configs/quickstart.py[:k=v,…] --workdir runs/quickstart``."""

from research import ablate, config
from scripts import common


def main():
    args = common.config_and_workdir_args(__doc__)
    common.start_distributed()
    ablate.run_ablation(config.load(args.config), args.workdir)


if __name__ == "__main__":
    common.run_main(main, trains=True)
