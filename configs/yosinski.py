"""Yosinski et al. 2014, "How transferable are features in deep neural networks?", as a sweep.

The classes split into two disjoint halves, A and B (variants ``a`` and ``b``; by default
Fashion-MNIST's classes 0–4 and 5–9, each half's whole training set). baseA and baseB train
from scratch on their half. For n = 1 … L−1 (L the model's blocks, the head last): BnB copies
the first n blocks of baseB, freezes them, re-initialises the blocks above (``init.dont_load``
over ``model.blocks``) and trains on B; BnB+ fine-tunes the copied blocks instead; AnB and AnB+
do the same from baseA (variant ``ns``: the n to run, by default all). Every run of seed s
starts from the base network of seed s. The plot, accuracy_vs_n.png, is laid out like the
paper's Figure 2: test accuracy on B against n, every network a dot and a line through the
means for baseB (at n = 0), BnB, BnB+, AnB and AnB+.

    python -m scripts.ablate --config configs/yosinski.py --workdir runs/yosinski
    python -m scripts.ablate --config "configs/yosinski.py:seeds=5,a=(0,2,4,6,8),b=(1,3,5,7,9)" \\
        --workdir runs/yosinski_odd_even
    python -m scripts.ablate --config configs/yosinski.py:reduced=True --workdir /tmp/yosinski

The paper (ImageNet split into two halves of 500 classes, an 8-layer network, n = 1 … 7):
baseB reaches 62.5% top-1; BnB dips to 59.4% at n = 5 (fragile co-adaptation of neighbouring
layers, which training cannot recover with the lower ones frozen); AnB falls to 54.3% by n = 7
(the higher layers' features are specific to A); AnB+ stays above baseB, by about 1.7 points on
average over n (transfer plus fine-tuning generalises better).

Measured here (2026-12-07, ``python -m scripts.ablate --config configs/yosinski.py``: the
small ResNet, blocks stem, stage1–3, head, so n = 1 … 4; 2 epochs per run, 3 seeds, 54 runs on
2 CPU cores of an AMD EPYC Zen 5 in 19 min 31 s), test accuracy on B, mean ± std over seeds:

    n        1                2                3                4
    BnB      0.9698 ± 0.0013  0.9706 ± 0.0026  0.9688 ± 0.0017  0.9673 ± 0.0008
    BnB+     0.9693 ± 0.0028  0.9701 ± 0.0012  0.9723 ± 0.0005  0.9741 ± 0.0012
    AnB      0.9710 ± 0.0022  0.9707 ± 0.0003  0.9671 ± 0.0009  0.8765 ± 0.0126
    AnB+     0.9711 ± 0.0026  0.9717 ± 0.0004  0.9727 ± 0.0014  0.9729 ± 0.0003

baseB 0.9679 ± 0.0004 (baseA 0.9172 on A). Two of the paper's three findings appeared: AnB
falls once the transferred features are A's highest (9.1 points below baseB at n = 4, the head
alone retrained on them), and AnB+ stays above baseB at every n, by 0.42 points on average
(the paper's 1.7). BnB shows no dip (fragile co-adaptation): it stays within 0.3 points of
baseB at every n, perhaps because 5 blocks on 28×28 images leave little to co-adapt. The +
variants train 2 more epochs than baseB from their copied start.
``reduced=True`` (LeNet-5, 20 examples per class of each half, 1 seed) is the suite's test that
the protocol runs end to end.
"""

import ml_collections

import models
from configs.common import base_config, sweep_config
from configs.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from research.config import parse_arg
from research.errors import ConfigError


def get_config(arg=None):
    arg = parse_arg(arg, a=(0, 1, 2, 3, 4), b=(5, 6, 7, 8, 9), ns=(), seeds=3, reduced=False)
    a, b = tuple(arg.a), tuple(arg.b)
    shared = sorted(set(a) & set(b))
    if shared or not a or not b:
        raise ConfigError(f"halves a={a} and b={b} must be disjoint and non-empty (they share "
                          f"{shared}): pick each class for one half only.")
    c = ml_collections.ConfigDict()
    c.name = "yosinski"

    c.transfer = base_config()
    c.transfer.model.name = "lenet5" if arg.reduced else "resnet_small"
    c.transfer.data.mean, c.transfer.data.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    c.transfer.train.epochs = 2.0
    c.transfer.train.batch_size = 128
    c.transfer.train.eval_every_epochs = 0.0
    c.transfer.train.checkpoint_every_epochs = 0.0
    c.transfer.train.keep_checkpoints = 1
    c.transfer.optim.lr = 0.1
    c.transfer.freeze.cache_prefix = True  # BnB and AnB train on their frozen blocks' output
    if arg.reduced:
        c.transfer.data.per_class = 20
        c.transfer.train.epochs = 3.0
        c.transfer.train.batch_size = 16
        c.transfer.optim.lr = 0.05
        c.transfer.train.progress = False

    blocks = models.create(c.transfer.model.name, num_classes=2).blocks
    c.sweep = sweep_config()
    c.sweep.grid = grid(blocks, a, b, tuple(arg.ns) or tuple(range(1, len(blocks))))
    c.sweep.seeds = tuple(range(1 if arg.reduced else arg.seeds))
    c.sweep.x = "n"
    c.sweep.show = ("baseB", "BnB", "BnB+", "AnB", "AnB+")  # baseA is tested on A
    return c


def grid(blocks, a, b, ns) -> tuple[dict, ...]:
    """baseA, baseB, then for each n of ``ns``: BnB, BnB+, AnB, AnB+ (all tested on B)."""
    base = {name: {"regime": name, "n": 0, "data.classes": half, "init.checkpoint": ""}
            for name, half in (("baseA", a), ("baseB", b))}
    points = [base["baseA"], base["baseB"]]
    for n in ns:
        for source in ("B", "A"):
            for fine_tune in (False, True):
                points.append({
                    "regime": f"{source}nB{'+' if fine_tune else ''}", "n": n,
                    "data.classes": b,
                    "init.checkpoint": "{runs}/base" + source + "_n0_seed{seed}",
                    "init.dont_load": tuple(f"{block}/.*" for block in blocks[n:]),
                    "freeze.depth": 0 if fine_tune else n})
    return tuple(points)
