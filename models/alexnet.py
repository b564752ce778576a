"""AlexNet (Krizhevsky, 2014, "One weird trick") in torchvision's layout.

Blocks: ``conv1`` … ``conv5``, ``fc6``, ``fc7``, ``head``; dropout precedes fc6 and fc7.
The features are average-pooled to 6×6 whatever the input size (at least 63×63), then
flattened in NHWC order (the torchvision converter reorders fc6's inputs accordingly).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models import layers
from models.registry import register

POOL_SIZE = 6
FC_FEATURES = 4096


class AlexNet(nn.Module):
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.5
    dtype: Any = jnp.float32
    blocks = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "head")

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        conv = functools.partial(layers.Conv, use_bias=True, dtype=self.dtype)
        x = nn.relu(conv(64, 11, 4, padding=((2, 2), (2, 2)), name="conv1")(x))
        x = layers.max_pool(x, 3, 2)
        x = nn.relu(conv(192, 5, name="conv2")(x))
        x = layers.max_pool(x, 3, 2)
        x = nn.relu(conv(384, 3, name="conv3")(x))
        x = nn.relu(conv(256, 3, name="conv4")(x))
        x = nn.relu(conv(256, 3, name="conv5")(x))
        x = layers.max_pool(x, 3, 2)
        x = layers.adaptive_avg_pool(x, POOL_SIZE).reshape(x.shape[0], -1)
        dropout = functools.partial(nn.Dropout, self.dropout, deterministic=not train)
        dense = functools.partial(layers.Dense, FC_FEATURES, act=nn.relu, dtype=self.dtype)
        x = dense(name="fc6")(dropout()(x))
        x = dense(name="fc7")(dropout()(x))
        if pre_logits:
            return x
        return layers.ClassifierHead(self.num_classes, dtype=self.dtype, name="head")(x)


register("alexnet", AlexNet, input_size=224, min_size=63, torchvision="alexnet")
