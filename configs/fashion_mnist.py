"""Train a model on Fashion-MNIST from scratch or from a checkpoint.

    python -m scripts.train --config configs/fashion_mnist.py --workdir runs/fmnist
    python -m scripts.train --config configs/fashion_mnist.py:model.name=lenet5 --workdir runs/lenet

resnet_small reaches about 0.896 test accuracy after 2 epochs (train.epochs=2.0); the default 5
epochs train further.
"""

from configs.common import base_config
from research.config import parse_arg

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (72.94,), (90.02,)


def get_config(arg=None):
    arg = parse_arg(arg)
    c = base_config()
    c.name = "fashion_mnist"
    c.model.name = "resnet_small"
    c.data.mean, c.data.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return c
