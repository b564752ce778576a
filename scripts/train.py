"""Train one config: ``python -m scripts.train --config configs/NAME.py[:k=v,…] --workdir DIR``.

Resumes from the latest checkpoint in the workdir.
"""

from research import config, train
from scripts import common


def main():
    args = common.config_and_workdir_args(__doc__)
    common.start_distributed()
    result = train.train_and_evaluate(config.load(args.config), args.workdir)
    print(f"step {result['step']}: test accuracy {result['test_accuracy']:.4f}, "
          f"test loss {result['test_loss']:.4f} ({result['trainable_params']:,} trainable "
          f"parameters, {result['seconds']:.0f} s)")


if __name__ == "__main__":
    common.run_main(main, trains=True)
