"""Xception (Chollet, 2017) in the layout of Keras's ``keras.applications.Xception``.

Entry flow ``block1`` (two plain 3×3 convs, "valid" padding) and ``block2`` … ``block4``,
middle flow ``block5`` … ``block12``, exit flow ``block13`` and ``block14``, then ``head``.
Parameter paths mirror Keras's layer names: ``block2_sepconv1_bn`` → ``block2/sepconv1_bn``,
``block2/sepconv1/depthwise/kernel``, ``block2/sepconv1/pointwise/kernel``; Keras leaves the
strided 1×1 shortcut unnamed, here it is ``block2/residual`` and ``block2/residual_bn``.
BatchNorm uses Keras's defaults (epsilon 1e-3, momentum 0.99). timm's ``legacy_xception`` (a
port of Keras's weights) needs ``padding="torch"`` (its strided max-pools pad 1 on each side,
as PyTorch's ``MaxPool2d(3, 2, 1)``, where Keras pads "same") and PyTorch's BatchNorm
(``bn_eps=1e-5``, ``bn_momentum=0.9``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models import layers
from models.registry import register

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.99

# (widths of the separable convs, downsample) of block2 … block13; block14 is ExitConvs.
RESIDUAL_BLOCKS = (
    ((128, 128), True), ((256, 256), True), ((728, 728), True),  # entry flow
    *(((728, 728, 728), False),) * 8,  # middle flow
    ((728, 1024), True),  # exit flow
)
FINAL_WIDTHS = (1536, 2048)


def bn(module: nn.Module, train: bool, name: str, act=None) -> nn.BatchNorm:
    return layers.BatchNorm(train, eps=module.bn_eps, momentum=module.bn_momentum,
                            dtype=module.dtype, act=act, name=name)


class SeparableConv(nn.Module):
    """Keras's ``SeparableConv2D`` without bias: depthwise 3×3 (SAME) then pointwise 1×1."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        x = layers.Conv(channels, 3, groups=channels, padding="same", dtype=self.dtype,
                        name="depthwise")(x)
        return layers.Conv(self.features, 1, dtype=self.dtype, name="pointwise")(x)


class EntryConvs(nn.Module):
    """``block1``: 3×3/2 conv (32) and 3×3 conv (64), both "valid", each with BN and ReLU."""

    bn_eps: float = KERAS_BN_EPS
    bn_momentum: float = KERAS_BN_MOMENTUM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, (features, strides) in enumerate(((32, 2), (64, 1)), 1):
            x = layers.Conv(features, 3, strides, padding="valid", dtype=self.dtype,
                            name=f"conv{i}")(x)
            x = bn(self, train, f"conv{i}_bn", nn.relu)(x)
        return x


class ResidualBlock(nn.Module):
    """(ReLU → separable conv → BN) per width, added to the input; with ``downsample``, a
    3×3/2 max-pool ends the branch and the shortcut is a strided 1×1 conv + BN."""

    widths: Sequence[int]
    downsample: bool
    relu_first: bool = True  # block2 follows block1's ReLU, so it starts with the conv
    padding: str = "same"
    bn_eps: float = KERAS_BN_EPS
    bn_momentum: float = KERAS_BN_MOMENTUM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = x
        for i, features in enumerate(self.widths, 1):
            if i > 1 or self.relu_first:
                y = nn.relu(y)
            y = SeparableConv(features, self.dtype, name=f"sepconv{i}")(y)
            y = bn(self, train, f"sepconv{i}_bn")(y)
        if not self.downsample:
            return layers.residual_sum(x, y)
        y = layers.max_pool(y, 3, 2, padding="same" if self.padding == "same" else 1)
        shortcut = layers.Conv(self.widths[-1], 1, 2, padding="same", dtype=self.dtype,
                               name="residual")(x)
        return layers.residual_sum(y, bn(self, train, "residual_bn")(shortcut))


class ExitConvs(nn.Module):
    """``block14``: (separable conv → BN → ReLU) twice, no shortcut."""

    widths: Sequence[int] = FINAL_WIDTHS
    bn_eps: float = KERAS_BN_EPS
    bn_momentum: float = KERAS_BN_MOMENTUM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, features in enumerate(self.widths, 1):
            x = SeparableConv(features, self.dtype, name=f"sepconv{i}")(x)
            x = bn(self, train, f"sepconv{i}_bn", nn.relu)(x)
        return x


class Xception(nn.Module):
    padding: str = "same"  # "torch": strided max-pools pad 1 on each side
    bn_eps: float = KERAS_BN_EPS
    bn_momentum: float = KERAS_BN_MOMENTUM
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.0
    dtype: Any = jnp.float32
    blocks = tuple(f"block{i}" for i in range(1, len(RESIDUAL_BLOCKS) + 3)) + ("head",)

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        bn_options = dict(bn_eps=self.bn_eps, bn_momentum=self.bn_momentum, dtype=self.dtype)
        x = EntryConvs(**bn_options, name="block1")(x, train)
        for index, (widths, downsample) in enumerate(RESIDUAL_BLOCKS, 2):
            block = ResidualBlock(widths, downsample, relu_first=index > 2,
                                  padding=self.padding, **bn_options, name=f"block{index}")
            x = block(x, train)
        x = ExitConvs(**bn_options, name=f"block{len(RESIDUAL_BLOCKS) + 2}")(x, train)
        x = layers.global_avg_pool(x)
        if pre_logits:
            return x
        return layers.ClassifierHead(self.num_classes, dropout=self.dropout, dtype=self.dtype,
                                     name="head")(x, train)


register("xception", Xception, input_size=299, min_size=71)
