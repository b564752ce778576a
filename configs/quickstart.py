"""The quickstart: how much of a network pretrained on one task should be frozen for another?

Pretrains the small ResNet on Fashion-MNIST classes 0–4 (T-shirt, trouser, pullover, dress,
coat), then transfers to classes 5–9 (sandal, shirt, sneaker, bag, ankle boot) with 100
labelled examples per class, comparing training from scratch, a linear probe, and fine-tuning
with the first 0…3 blocks frozen.

    python -m scripts.ablate --config configs/quickstart.py --workdir runs/quickstart
    python -m scripts.ablate --config configs/quickstart.py:seeds=3 --workdir runs/qs3
    python -m scripts.ablate --config "configs/quickstart.py:depths=(0,2),regimes=('finetune',)" \
        --workdir runs/qs02
    python -m scripts.ablate --config configs/quickstart.py:reduced=True --workdir /tmp/qs

A sweep (research.ablate): its variants pick ``seeds`` (0 … seeds−1), fine-tuning ``depths``
(empty: 0 … all-but-probe) and ``regimes``. Writes results.csv, summary.csv, summary.md and
accuracy_vs_freeze_depth.png in the workdir; README.md's quickstart lists the test accuracies
it reaches. Runs with frozen blocks, the linear probe among them,
train on their frozen prefix's cached output (``freeze.cache_prefix``).
``reduced=True`` is a short version for tests.
"""

import ml_collections

import models
from configs.common import base_config, sweep_config
from configs.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from research.ablate import axis, product
from research.config import parse_arg

REGIMES = ("scratch", "linear_probe", "finetune")


def get_config(arg=None):
    arg = parse_arg(arg, seeds=1, depths=(), regimes=REGIMES, reduced=False)
    c = ml_collections.ConfigDict()
    c.name = "quickstart"

    c.pretrain = base_config()
    c.pretrain.name = "pretrain"
    c.pretrain.model.name = "resnet_small"
    c.pretrain.data.classes = (0, 1, 2, 3, 4)
    c.pretrain.data.mean, c.pretrain.data.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    c.pretrain.train.epochs = 2.0
    c.pretrain.train.batch_size = 128
    c.pretrain.optim.lr = 0.1

    c.transfer = base_config()
    c.transfer.data.classes = (5, 6, 7, 8, 9)
    c.transfer.data.per_class = 100
    c.transfer.data.mean, c.transfer.data.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    c.transfer.train.epochs = 15.0
    c.transfer.train.batch_size = 50
    c.transfer.train.eval_every_epochs = 0.0
    c.transfer.train.checkpoint_every_epochs = 0.0
    c.transfer.train.keep_checkpoints = 1
    c.transfer.optim.lr = 0.02
    c.transfer.freeze.cache_prefix = True  # runs with frozen blocks train on their cached output

    c.transfer.init.checkpoint = "{pretrain}"

    blocks = len(models.create(c.pretrain.model.name, num_classes=2).blocks)
    probe_depth = blocks - 1  # every block but the head frozen
    depths = tuple(arg.depths) or tuple(range(probe_depth))
    points = {
        "scratch": ({"regime": "scratch", "init.checkpoint": "",
                     "model.name": c.pretrain.model.name},),
        "linear_probe": ({"regime": "linear_probe", "freeze.depth": probe_depth,
                          "optim.lr": 0.1},),
        "finetune": product(({"regime": "finetune"},), axis("freeze.depth", depths)),
    }
    c.sweep = sweep_config()
    c.sweep.grid = sum((points[regime] for regime in arg.regimes), ())
    c.sweep.seeds = tuple(range(arg.seeds))

    if arg.reduced:
        c.pretrain.train.epochs = 0.25
        c.pretrain.train.eval_every_epochs = 0.0
        c.transfer.data.per_class = 20
        c.transfer.train.epochs = 3.0
        c.transfer.train.batch_size = 16
        for section in (c.pretrain, c.transfer):
            section.train.progress = False
    return c
