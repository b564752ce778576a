"""VGG (Simonyan & Zisserman, 2014) in torchvision's layout, with optional BatchNorm.

Blocks: ``block1`` … ``block5`` (the 3×3 convs of one pooling stage, each followed by a
2×2 max-pool), ``fc6``, ``fc7``, ``head``; dropout follows fc6 and fc7. Parameter paths:
``block3/conv2/kernel``, ``block3/bn2/scale``. The features are average-pooled to 7×7
whatever the input size (at least 32×32), then flattened in NHWC order (the torchvision
converter reorders fc6's inputs accordingly). Dense layers start from N(0, 0.01) as in
torchvision.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models import layers
from models.registry import register

POOL_SIZE = 7
FC_FEATURES = 4096
classifier_init = nn.initializers.normal(0.01)


class VGGBlock(nn.Module):
    """``depth`` × (3×3 conv [→ BN] → ReLU), then a 2×2 max-pool."""

    depth: int
    features: int
    batch_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j in range(1, self.depth + 1):
            x = layers.Conv(self.features, 3, use_bias=True, dtype=self.dtype, name=f"conv{j}")(x)
            if self.batch_norm:
                x = layers.BatchNorm(train, dtype=self.dtype, act=nn.relu, name=f"bn{j}")(x)
            else:
                x = nn.relu(x)
        return layers.max_pool(x, 2, 2)


class VGG(nn.Module):
    depths: Sequence[int]
    widths: Sequence[int] = (64, 128, 256, 512, 512)
    batch_norm: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        return (*(f"block{i}" for i in range(1, len(self.depths) + 1)), "fc6", "fc7", "head")

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        for i, (depth, width) in enumerate(zip(self.depths, self.widths), start=1):
            x = VGGBlock(depth, width, self.batch_norm, self.dtype, name=f"block{i}")(x, train)
        x = layers.adaptive_avg_pool(x, POOL_SIZE).reshape(x.shape[0], -1)
        dense = functools.partial(layers.Dense, FC_FEATURES, act=nn.relu,
                                  kernel_init=classifier_init, dtype=self.dtype)
        x = dense(name="fc6")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = dense(name="fc7")(x)
        if pre_logits:
            return x
        return layers.ClassifierHead(self.num_classes, dropout=self.dropout,
                                     kernel_init=classifier_init, dtype=self.dtype,
                                     name="head")(x, train)


VGG11 = functools.partial(VGG, depths=(1, 1, 2, 2, 2))  # configuration A
VGG13 = functools.partial(VGG, depths=(2, 2, 2, 2, 2))  # B
VGG16 = functools.partial(VGG, depths=(2, 2, 3, 3, 3))  # D
VGG19 = functools.partial(VGG, depths=(2, 2, 4, 4, 4))  # E
VGG11BN = functools.partial(VGG11, batch_norm=True)
VGG13BN = functools.partial(VGG13, batch_norm=True)
VGG16BN = functools.partial(VGG16, batch_norm=True)
VGG19BN = functools.partial(VGG19, batch_norm=True)

for _name, _factory in [("vgg11", VGG11), ("vgg13", VGG13), ("vgg16", VGG16), ("vgg19", VGG19),
                        ("vgg11_bn", VGG11BN), ("vgg13_bn", VGG13BN), ("vgg16_bn", VGG16BN),
                        ("vgg19_bn", VGG19BN)]:
    register(_name, _factory, input_size=224, min_size=32, torchvision=_name)
