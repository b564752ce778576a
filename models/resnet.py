"""ResNet (He et al., 2015) in torchvision's layout (stride in the 3×3 conv, "ResNet v1.5").

Blocks: ``stem``, ``stage1`` … ``stageN``, ``head``. Parameter paths mirror torchvision:
``stage2/block0/conv1/kernel``, ``stage2/block0/downsample/conv/kernel``, ``head/kernel``.
``resnet_small`` is a 3-stage ResNet for 28×28 / 32×32 inputs (3×3 stem, no max-pool).

Keras's ResNets are the original v1: ``stride_in_1x1`` (a bottleneck strides its first 1×1
conv), ``conv_bias`` (every conv has a bias) and ``bn_eps=1.001e-5``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models import layers
from models.registry import register


class Block(nn.Module):
    """The fields both residual blocks share."""

    features: int
    strides: int = 1
    conv_bias: bool = False
    bn_eps: float = layers.TORCH_BN_EPS
    stride_in_1x1: bool = False  # Bottleneck only: BasicBlock strides its first conv anyway
    dtype: Any = jnp.float32

    def conv(self, features: int, kernel_size: int, strides: int = 1, *, name: str):
        return layers.Conv(features, kernel_size, strides, use_bias=self.conv_bias,
                           dtype=self.dtype, name=name)

    def bn(self, train: bool, *, act=None, name: str):
        return layers.BatchNorm(train, eps=self.bn_eps, dtype=self.dtype, act=act, name=name)

    def shortcut(self, x, out_features: int, train: bool):
        """Identity, or a strided 1×1 conv + BN (torchvision's ``downsample``) when shapes
        change."""
        if x.shape[-1] == out_features and self.strides == 1:
            return x
        return layers.ConvBN(out_features, 1, self.strides, act=None, use_bias=self.conv_bias,
                             bn_eps=self.bn_eps, dtype=self.dtype, name="downsample")(x, train)


class BasicBlock(Block):
    @nn.compact
    def __call__(self, x, train: bool = False):
        y = self.conv(self.features, 3, self.strides, name="conv1")(x)
        y = self.bn(train, act=nn.relu, name="bn1")(y)
        y = self.conv(self.features, 3, name="conv2")(y)
        y = self.bn(train, name="bn2")(y)
        return layers.residual_relu(y, self.shortcut(x, self.features, train))


class Bottleneck(Block):
    @nn.compact
    def __call__(self, x, train: bool = False):
        stride1, stride2 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        y = self.conv(self.features, 1, stride1, name="conv1")(x)
        y = self.bn(train, act=nn.relu, name="bn1")(y)
        y = self.conv(self.features, 3, stride2, name="conv2")(y)
        y = self.bn(train, act=nn.relu, name="bn2")(y)
        y = self.conv(self.features * 4, 1, name="conv3")(y)
        y = self.bn(train, name="bn3")(y)
        return layers.residual_relu(y, self.shortcut(x, self.features * 4, train))


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: type[nn.Module] = BasicBlock
    widths: Sequence[int] = (64, 128, 256, 512)
    small_stem: bool = False  # 3×3 stride-1 stem without max-pool, for 28×28 / 32×32 images
    stride_in_1x1: bool = False  # Keras's v1 bottleneck: the stride in conv1, not conv2
    conv_bias: bool = False
    bn_eps: float = layers.TORCH_BN_EPS
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("stem", *(f"stage{i + 1}" for i in range(len(self.stage_sizes))), "head")

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = Stem(self.widths[0], self.small_stem, self.conv_bias, self.bn_eps, self.dtype,
                 name="stem")(x, train)
        block = functools.partial(self.block_cls, conv_bias=self.conv_bias, bn_eps=self.bn_eps,
                                  stride_in_1x1=self.stride_in_1x1, dtype=self.dtype)
        for i, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
            x = Stage(block, n, width, 1 if i == 0 else 2, name=f"stage{i + 1}")(x, train)
        x = layers.global_avg_pool(x)
        if pre_logits:
            return x
        return layers.ClassifierHead(self.num_classes, dropout=self.dropout, dtype=self.dtype,
                                     name="head")(x, train)


class Stem(nn.Module):
    features: int
    small: bool = False
    conv_bias: bool = False
    bn_eps: float = layers.TORCH_BN_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kernel_size, strides = (3, 1) if self.small else (7, 2)
        x = layers.Conv(self.features, kernel_size, strides, use_bias=self.conv_bias,
                        dtype=self.dtype, name="conv1")(x)
        x = layers.BatchNorm(train, eps=self.bn_eps, dtype=self.dtype, act=nn.relu,
                             name="bn1")(x)
        return x if self.small else layers.max_pool(x, 3, 2, padding=1)


class Stage(nn.Module):
    block: Callable[..., nn.Module]  # a Block class, with its options bound
    num_blocks: int
    features: int
    strides: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j in range(self.num_blocks):
            x = self.block(self.features, self.strides if j == 0 else 1, name=f"block{j}")(x, train)
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
