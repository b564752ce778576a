"""Run an ablation config (e.g. the quickstart): ``python -m scripts.ablate --config
configs/quickstart.py[:k=v,…] --workdir runs/quickstart``."""

from scripts import common

common.set_cpu_defaults()


def main():
    args = common.config_and_workdir_args(__doc__)
    common.start_distributed()
    from research import ablate, config
    ablate.run_ablation(config.load(args.config), args.workdir)


if __name__ == "__main__":
    common.run_main(main)
