"""Run a sweep config (e.g. the quickstart): ``python -m scripts.ablate --config
configs/quickstart.py[:k=v,…] --workdir runs/quickstart [--list | --only NAME | --collect]``.

Without an option it runs every run of the sweep not yet finished, then writes the results.
``--list`` prints one command per run (for a job runner: a SLURM array, say, one line a task;
pretraining first, and a run that starts from another run after it); ``--only NAME`` runs that
one run; ``--collect`` writes the results of whatever has finished.
"""

from research import ablate, config
from scripts import common


def main():
    parser = common.config_and_workdir_parser(__doc__)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="print one command per run")
    what.add_argument("--only", metavar="NAME", help="run one run (a name --list prints)")
    what.add_argument("--collect", action="store_true",
                      help="write results.csv, summary and plots of the finished runs")
    args = parser.parse_args()
    cfg = config.load(args.config)
    if args.list:
        print("\n".join(ablate.list_commands(cfg, args.config, args.workdir)))
        return
    common.start_distributed()
    if args.collect:
        ablate.collect(cfg, args.workdir)
    else:
        ablate.run_sweep(cfg, args.workdir, only=args.only)


if __name__ == "__main__":
    common.run_main(main, trains=True)
