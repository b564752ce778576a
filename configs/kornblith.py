"""Kornblith, Shlens and Le 2019, "Do Better ImageNet Models Transfer Better?": three regimes.

Pretrains the small ResNet on all of Fashion-MNIST, then transfers it to scikit-learn's 8×8
digits (resized to 28×28) at several training-set sizes (variant ``sizes``: examples per
class, 0 for all, by default 10, 50 and all), comparing:

- ``logistic``: logistic regression on the frozen penultimate features: every block but the
  head frozen, the head trained on the frozen prefix's output, computed once
  (``freeze.cache_prefix``: the ablation's linear probe), with its L2 strength
  (``optim.weight_decay``) chosen among ``l2`` by accuracy on a validation split held out of
  the training examples (``sweep.holdout``, a fifth), then trained on them all;
- ``finetune``: every parameter fine-tuned from the pretrained weights;
- ``scratch``: the same network trained from random weights.

    python -m scripts.ablate --config configs/kornblith.py --workdir runs/kornblith
    python -m scripts.ablate --config configs/kornblith.py:seeds=5,sizes=(5,20) --workdir runs/k5
    python -m scripts.ablate --config configs/kornblith.py:reduced=True --workdir /tmp/kornblith

The plot, accuracy_vs_n_train.png, draws test accuracy against training examples, a line per
regime. The paper (ImageNet networks, 12 datasets) found fine-tuning best, logistic regression
close behind on datasets near ImageNet and far behind on others, and training from scratch
catching up with fine-tuning only on the largest training sets.

Measured here (2026-12-07, ``python -m scripts.ablate --config configs/kornblith.py``, 3 seeds,
27 runs and the logistic regression's L2 choice, on 2 CPU cores of an AMD EPYC Zen 5 in 3 min
41 s): the pretrained network reached 0.898 on Fashion-MNIST's test set; test accuracy on
digits (360 images), mean ± std over seeds:

    examples per class   10 (100 in all)  50 (500)         all (1437)
    logistic             0.7296 ± 0.0064  0.7916 ± 0.0247  0.8324 ± 0.0042
    finetune             0.9185 ± 0.0209  0.9787 ± 0.0070  0.9898 ± 0.0070
    scratch              0.9231 ± 0.0116  0.9787 ± 0.0016  0.9861 ± 0.0048

Logistic regression on the frozen features stayed 16–19 points behind fine-tuning at every
size, the paper's finding for datasets far from the pretraining one (clothing photographs to
handwritten digits). Training from scratch matched fine-tuning at every size, within a
standard deviation, where the paper found it behind on small training sets: 8×8 digits
upsampled to 28×28 are easy enough for this network to learn from 10 examples a class. The L2
strengths chosen on the held-out fifth: 0.01 at 10 and 50 per class, 0 on all. ``reduced=True``
is the suite's test that the protocol runs end to end.
"""

import ml_collections

import models
from configs.common import base_config, sweep_config
from configs.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from research.ablate import product
from research.config import parse_arg

DIGITS_MEAN, DIGITS_STD = (78.06,), (96.10,)  # its 0–16 values scaled to 0–255
EPOCHS = {5: 40.0, 10: 30.0, 20: 20.0, 50: 10.0, 0: 4.0}  # examples per class → epochs


def get_config(arg=None):
    arg = parse_arg(arg, sizes=(10, 50, 0), l2=(0.0, 1e-4, 1e-3, 1e-2), seeds=3,
                    reduced=False)
    c = ml_collections.ConfigDict()
    c.name = "kornblith"

    c.pretrain = base_config()
    c.pretrain.name = "pretrain"
    c.pretrain.model.name = "resnet_small"
    c.pretrain.data.mean, c.pretrain.data.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    c.pretrain.train.epochs = 2.0
    c.pretrain.train.batch_size = 128
    c.pretrain.optim.lr = 0.1

    c.transfer = base_config()
    c.transfer.init.checkpoint = "{pretrain}"
    c.transfer.data.name = "digits"
    c.transfer.data.image_size = 28  # the pretrained network's resolution
    c.transfer.data.mean, c.transfer.data.std = DIGITS_MEAN, DIGITS_STD
    c.transfer.train.batch_size = 16
    c.transfer.train.eval_every_epochs = 0.0
    c.transfer.train.checkpoint_every_epochs = 0.0
    c.transfer.train.keep_checkpoints = 1
    c.transfer.optim.lr = 0.02
    c.transfer.freeze.cache_prefix = True  # the logistic regression's features, computed once

    sizes = tuple(arg.sizes)
    if arg.reduced:
        c.pretrain.data.per_class = 100
        c.pretrain.train.epochs = 1.0
        c.pretrain.train.eval_every_epochs = 0.0
        sizes, arg.l2 = (10,), (0.0, 1e-2)
        for section in (c.pretrain, c.transfer):
            section.train.progress = False

    blocks = models.create(c.pretrain.model.name, num_classes=2).blocks
    regimes = (
        {"regime": "logistic", "freeze.depth": len(blocks) - 1, "optim.lr": 0.1,
         "choose": {"optim.weight_decay": tuple(arg.l2)}},
        {"regime": "finetune"},
        {"regime": "scratch", "init.checkpoint": "", "model.name": c.pretrain.model.name},
    )
    per_size = tuple({"data.per_class": n,
                      "train.epochs": 3.0 if arg.reduced else EPOCHS.get(n, 10.0)}
                     for n in sizes)
    c.sweep = sweep_config()
    c.sweep.grid = product(per_size, regimes)
    c.sweep.seeds = tuple(range(1 if arg.reduced else arg.seeds))
    c.sweep.x = "n_train"
    return c
