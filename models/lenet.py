"""LeNet-5 (LeCun et al., 1998) with ReLU and the full C3 connection table.

Inputs smaller than 32×32 are zero-padded to 32×32 first, as the paper pads 28×28 digits.
Blocks: ``c1``, ``c3``, ``c5``, ``f6``, ``head``: 61,706 parameters for 10 classes.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models import layers
from models.registry import register

PAPER_SIZE = 32


class LeNet5(nn.Module):
    num_classes: int = 10
    in_chans: int = 1
    dropout: float = 0.0
    dtype: Any = jnp.float32
    blocks = ("c1", "c3", "c5", "f6", "head")

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = _pad_to(x, PAPER_SIZE)
        conv = functools.partial(layers.Conv, kernel_size=5, padding="valid", use_bias=True,
                                 dtype=self.dtype)
        x = layers.avg_pool(nn.relu(conv(6, name="c1")(x)), 2, 2)
        x = layers.avg_pool(nn.relu(conv(16, name="c3")(x)), 2, 2)
        x = nn.relu(conv(120, name="c5")(x))
        x = x.reshape(x.shape[0], -1)
        x = layers.Dense(84, act=nn.relu, dtype=self.dtype, name="f6")(x)
        if pre_logits:
            return x
        return layers.ClassifierHead(self.num_classes, dropout=self.dropout, dtype=self.dtype,
                                     name="head")(x, train)


def _pad_to(x, size: int):
    pad_h, pad_w = max(size - x.shape[1], 0), max(size - x.shape[2], 0)
    return jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                       (0, 0)))


register("lenet5", LeNet5, input_size=32, min_size=28)
