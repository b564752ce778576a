"""EfficientNet B0–B7 (Tan & Le, 2019) in torchvision's layout.

Blocks: ``stem``, ``stage1`` … ``stage7`` (torchvision's ``features[1..7]``), ``features_last``
(the 1×1 conv to 4× the last stage's width), ``head``. Parameter paths:
``stage2/block0/expand/conv/kernel``, ``stage2/block0/se/reduce/kernel`` (the blocks are
``models.mobilenet.InvertedResidual``). Keras's EfficientNets need ``padding="same"``,
``bn_eps=1e-3`` and ``bn_momentum=0.99``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models import layers
from models.mobilenet import (TF_BN_EPS, TF_BN_MOMENTUM, BlockSpec, InvertedResidual,
                              conv_options)
from models.registry import register

# expand ratio, kernel, first stride, in, out, repeats: B0's table, scaled for B1–B7.
STAGES = (
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


class Stage(nn.Module):
    """One row of the table: ``block0`` … ``blockN``, inverted residuals with squeeze-excite."""

    specs: tuple[BlockSpec, ...]
    padding: str = "torch"
    bn_eps: float = layers.TORCH_BN_EPS
    bn_momentum: float = layers.TORCH_BN_MOMENTUM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j, spec in enumerate(self.specs):
            x = InvertedResidual(spec, **conv_options(self), name=f"block{j}")(x, train)
        return x


class EfficientNet(nn.Module):
    width_mult: float = 1.0
    depth_mult: float = 1.0
    drop_path: float = 0.2  # stochastic depth: block k of n drops at rate drop_path * k / n
    padding: str = "torch"
    bn_eps: float = layers.TORCH_BN_EPS
    bn_momentum: float = layers.TORCH_BN_MOMENTUM
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.2
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("stem", *(f"stage{i + 1}" for i in range(len(STAGES))), "features_last", "head")

    def _width(self, channels: float) -> int:
        return layers.make_divisible(channels * self.width_mult)

    def stage_specs(self) -> list[tuple[BlockSpec, ...]]:
        repeats = [math.ceil(row[-1] * self.depth_mult) for row in STAGES]
        total, index, stages = sum(repeats), 0, []
        for (ratio, kernel, stride, in_features, out, _), n in zip(STAGES, repeats):
            in_features, out, specs = self._width(in_features), self._width(out), []
            for j in range(n):
                specs.append(BlockSpec(
                    in_features, out, layers.make_divisible(in_features * ratio), kernel,
                    stride if j == 0 else 1, nn.silu, se_channels=max(1, in_features // 4),
                    se_act=nn.silu, drop_path=self.drop_path * index / total))
                in_features, index = out, index + 1
            stages.append(tuple(specs))
        return stages

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        conv_bn = functools.partial(layers.ConvBN, act=nn.silu, **conv_options(self))
        stages = self.stage_specs()
        x = conv_bn(stages[0][0].in_features, 3, 2, name="stem")(x, train)
        for i, specs in enumerate(stages, start=1):
            x = Stage(specs, **conv_options(self), name=f"stage{i}")(x, train)
        x = conv_bn(4 * stages[-1][-1].features, 1, name="features_last")(x, train)
        x = layers.global_avg_pool(x)
        if pre_logits:
            return x
        return layers.ClassifierHead(self.num_classes, dropout=self.dropout, dtype=self.dtype,
                                     name="head")(x, train)


# torchvision trains B5–B7 with BatchNorm(eps=1e-3, momentum=0.01), B0–B4 with the defaults.
_B5_TO_B7_BN = dict(bn_eps=TF_BN_EPS, bn_momentum=TF_BN_MOMENTUM)
EfficientNetB0 = functools.partial(EfficientNet, width_mult=1.0, depth_mult=1.0, dropout=0.2)
EfficientNetB1 = functools.partial(EfficientNet, width_mult=1.0, depth_mult=1.1, dropout=0.2)
EfficientNetB2 = functools.partial(EfficientNet, width_mult=1.1, depth_mult=1.2, dropout=0.3)
EfficientNetB3 = functools.partial(EfficientNet, width_mult=1.2, depth_mult=1.4, dropout=0.3)
EfficientNetB4 = functools.partial(EfficientNet, width_mult=1.4, depth_mult=1.8, dropout=0.4)
EfficientNetB5 = functools.partial(EfficientNet, width_mult=1.6, depth_mult=2.2, dropout=0.4,
                                   **_B5_TO_B7_BN)
EfficientNetB6 = functools.partial(EfficientNet, width_mult=1.8, depth_mult=2.6, dropout=0.5,
                                   **_B5_TO_B7_BN)
EfficientNetB7 = functools.partial(EfficientNet, width_mult=2.0, depth_mult=3.1, dropout=0.5,
                                   **_B5_TO_B7_BN)

# The paper's (and Keras's) resolutions; torchvision evaluates B2 at 288.
for _name, _factory, _size in [
        ("efficientnet_b0", EfficientNetB0, 224), ("efficientnet_b1", EfficientNetB1, 240),
        ("efficientnet_b2", EfficientNetB2, 260), ("efficientnet_b3", EfficientNetB3, 300),
        ("efficientnet_b4", EfficientNetB4, 380), ("efficientnet_b5", EfficientNetB5, 456),
        ("efficientnet_b6", EfficientNetB6, 528), ("efficientnet_b7", EfficientNetB7, 600)]:
    register(_name, _factory, input_size=_size, min_size=32, torchvision=_name)
