"""ResNet (He et al., 2015) in torchvision's layout (stride in the 3×3 conv, "ResNet v1.5").

Blocks: ``stem``, ``stage1`` … ``stageN``, ``head``. Parameter paths mirror torchvision:
``stage2/block0/conv1/kernel``, ``stage2/block0/downsample/conv/kernel``, ``head/kernel``.
``resnet_small`` is a 3-stage ResNet for 28×28 / 32×32 inputs (3×3 stem, no max-pool).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models import layers
from models.registry import register


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(layers.BatchNorm, train, dtype=self.dtype)
        y = layers.Conv(self.features, 3, self.strides, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = layers.Conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        y = bn(name="bn2")(y)
        return nn.relu(y + _shortcut(self, x, self.features, train))


class Bottleneck(nn.Module):
    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(layers.BatchNorm, train, dtype=self.dtype)
        y = layers.Conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = layers.Conv(self.features, 3, self.strides, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(bn(name="bn2")(y))
        y = layers.Conv(self.features * 4, 1, dtype=self.dtype, name="conv3")(y)
        y = bn(name="bn3")(y)
        return nn.relu(y + _shortcut(self, x, self.features * 4, train))


def _shortcut(block: nn.Module, x, out_features: int, train: bool):
    """Identity, or a strided 1×1 conv + BN (torchvision's ``downsample``) when shapes change."""
    if x.shape[-1] == out_features and block.strides == 1:
        return x
    return layers.ConvBN(out_features, 1, block.strides, act=None, dtype=block.dtype,
                         name="downsample")(x, train)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: type[nn.Module] = BasicBlock
    widths: Sequence[int] = (64, 128, 256, 512)
    small_stem: bool = False  # 3×3 stride-1 stem without max-pool, for 28×28 / 32×32 images
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("stem", *(f"stage{i + 1}" for i in range(len(self.stage_sizes))), "head")

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = Stem(self.widths[0], self.small_stem, self.dtype, name="stem")(x, train)
        for i, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
            stage = Stage(self.block_cls, n, width, 1 if i == 0 else 2, self.dtype,
                          name=f"stage{i + 1}")
            x = stage(x, train)
        x = layers.global_avg_pool(x)
        if pre_logits:
            return x
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class Stem(nn.Module):
    features: int
    small: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.small:
            x = layers.Conv(self.features, 3, 1, dtype=self.dtype, name="conv1")(x)
            return nn.relu(layers.BatchNorm(train, dtype=self.dtype, name="bn1")(x))
        x = layers.Conv(self.features, 7, 2, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(layers.BatchNorm(train, dtype=self.dtype, name="bn1")(x))
        return layers.max_pool(x, 3, 2, padding=1)


class Stage(nn.Module):
    block_cls: type[nn.Module]
    num_blocks: int
    features: int
    strides: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j in range(self.num_blocks):
            block = self.block_cls(self.features, self.strides if j == 0 else 1, self.dtype,
                                   name=f"block{j}")
            x = block(x, train)
        return x


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
ResNetSmall = functools.partial(ResNet, stage_sizes=(1, 1, 1), widths=(16, 32, 64),
                                block_cls=BasicBlock, small_stem=True)

for _name, _factory in [("resnet18", ResNet18), ("resnet34", ResNet34), ("resnet50", ResNet50),
                        ("resnet101", ResNet101), ("resnet152", ResNet152)]:
    register(_name, _factory, input_size=224, min_size=32, torchvision=_name)
register("resnet_small", ResNetSmall, input_size=28, min_size=8)
