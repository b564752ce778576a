"""MobileNet V1 (Keras's layout), V2 and V3 (torchvision's), and the inverted residual block that
V2, V3 and EfficientNet share.

Blocks: ``stem``, ``block1`` … ``blockN`` (each depthwise-separable block or inverted residual is
its own block, as each is one of torchvision's ``features[i]``), ``features_last`` (the final
1×1 conv; V2 and V3), then the classifier: ``head`` (V3: ``pre_head``, ``head``).
Parameter paths: ``block3/expand/conv/kernel``, ``block3/depthwise/bn/scale``,
``block3/se/reduce/kernel``, ``block3/project/conv/kernel``; V1: ``block3/depthwise/conv/kernel``,
``block3/pointwise/bn/scale``.

``padding``, ``bn_eps`` and ``bn_momentum`` are fields for Keras's variants (TensorFlow's "same"
padding, BatchNorm epsilon 1e-3); V1 defaults to Keras's. Keras's V3 also needs
``keras_widths`` (its channel rounding when α ≠ 1) and offers ``minimalistic`` (3×3 kernels,
ReLU, no squeeze-excite).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.registry import register

# TensorFlow's BatchNorm defaults, which torchvision keeps for MobileNetV3 and EfficientNet-B5–B7.
TF_BN_EPS = 1e-3
TF_BN_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One inverted residual: 1×1 expand (absent when ``expanded == in_features``) → k×k
    depthwise → optional squeeze-excite → linear 1×1 projection, plus an identity shortcut
    when the block keeps the shape."""

    in_features: int
    features: int
    expanded: int
    kernel_size: int = 3
    strides: int = 1
    act: layers.Activation = jax.nn.relu6
    se_channels: int = 0  # 0: no squeeze-excite
    se_act: layers.Activation = nn.relu
    se_gate: layers.Activation = jax.nn.sigmoid
    drop_path: float = 0.0  # stochastic depth rate of the residual branch

    @property
    def has_expand(self) -> bool:
        return self.expanded != self.in_features

    @property
    def has_shortcut(self) -> bool:
        return self.strides == 1 and self.in_features == self.features


def conv_options(module: nn.Module) -> dict:
    """The convolution and BatchNorm options of ``module``, for its ``ConvBN`` layers."""
    return dict(padding=module.padding, bn_eps=module.bn_eps, bn_momentum=module.bn_momentum,
                dtype=module.dtype)


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual, also MobileNetV3's bottleneck and EfficientNet's MBConv
    (see ``BlockSpec``). Parameters: ``expand``, ``depthwise``, ``se``, ``project``."""

    spec: BlockSpec
    padding: str = "torch"
    bn_eps: float = layers.TORCH_BN_EPS
    bn_momentum: float = layers.TORCH_BN_MOMENTUM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        spec = self.spec
        conv_bn = functools.partial(layers.ConvBN, **conv_options(self))
        y = x
        if spec.has_expand:
            y = conv_bn(spec.expanded, 1, act=spec.act, name="expand")(y, train)
        y = conv_bn(spec.expanded, spec.kernel_size, spec.strides, groups=spec.expanded,
                    act=spec.act, name="depthwise")(y, train)
        if spec.se_channels:
            y = layers.SqueezeExcite(spec.se_channels, spec.se_act, spec.se_gate, self.dtype,
                                     name="se")(y)
        y = conv_bn(spec.features, 1, act=None, name="project")(y, train)
        if spec.has_shortcut:
            return layers.residual_sum(x, layers.StochasticDepth(spec.drop_path)(y, train))
        return y


def inverted_residual_features(model: nn.Module, x, specs: Sequence[BlockSpec], act,
                               last_features: int, train: bool):
    """3×3 stride-2 ``stem`` → ``block1`` … ``blockN`` → 1×1 ``features_last`` (V2 and V3)."""
    conv_bn = functools.partial(layers.ConvBN, act=act, **conv_options(model))
    x = conv_bn(specs[0].in_features, 3, 2, name="stem")(x, train)
    for i, spec in enumerate(specs, start=1):
        x = InvertedResidual(spec, **conv_options(model), name=f"block{i}")(x, train)
    return conv_bn(last_features, 1, name="features_last")(x, train)


def _scaled(channels: int, multiplier: float) -> int:
    return layers.make_divisible(channels * multiplier)


V2_SETTING = (  # expansion t, channels c, repeats n, first stride s (torchvision's table)
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    width_mult: float = 1.0
    padding: str = "torch"
    bn_eps: float = layers.TORCH_BN_EPS
    bn_momentum: float = layers.TORCH_BN_MOMENTUM
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.2
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("stem", *(f"block{i + 1}" for i in range(len(self.block_specs()))),
                "features_last", "head")

    def block_specs(self) -> list[BlockSpec]:
        specs, in_features = [], _scaled(32, self.width_mult)
        for t, c, n, s in V2_SETTING:
            features = _scaled(c, self.width_mult)
            for j in range(n):
                specs.append(BlockSpec(in_features, features, round(in_features * t),
                                       strides=s if j == 0 else 1))
                in_features = features
        return specs

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        last = _scaled(1280, max(1.0, self.width_mult))
        x = inverted_residual_features(self, x, self.block_specs(), jax.nn.relu6, last, train)
        x = layers.global_avg_pool(x)
        if pre_logits:
            return x
        return layers.ClassifierHead(self.num_classes, dropout=self.dropout, dtype=self.dtype,
                                     name="head")(x, train)


_RE, _HS = nn.relu, layers.hard_swish
# kernel, expanded, out, squeeze-excite, activation, stride (torchvision's tables)
V3_LARGE = (
    (3, 16, 16, False, _RE, 1), (3, 64, 24, False, _RE, 2), (3, 72, 24, False, _RE, 1),
    (5, 72, 40, True, _RE, 2), (5, 120, 40, True, _RE, 1), (5, 120, 40, True, _RE, 1),
    (3, 240, 80, False, _HS, 2), (3, 200, 80, False, _HS, 1), (3, 184, 80, False, _HS, 1),
    (3, 184, 80, False, _HS, 1), (3, 480, 112, True, _HS, 1), (3, 672, 112, True, _HS, 1),
    (5, 672, 160, True, _HS, 2), (5, 960, 160, True, _HS, 1), (5, 960, 160, True, _HS, 1))
V3_SMALL = (
    (3, 16, 16, True, _RE, 2), (3, 72, 24, False, _RE, 2), (3, 88, 24, False, _RE, 1),
    (5, 96, 40, True, _HS, 2), (5, 240, 40, True, _HS, 1), (5, 240, 40, True, _HS, 1),
    (5, 120, 48, True, _HS, 1), (5, 144, 48, True, _HS, 1), (5, 288, 96, True, _HS, 2),
    (5, 576, 96, True, _HS, 1), (5, 576, 96, True, _HS, 1))


class MobileNetV3(nn.Module):
    setting: Sequence[tuple] = V3_LARGE
    pre_head_features: int = 1280  # before width scaling
    width_mult: float = 1.0
    # Keras scales a block's expansion ratio times its actual input width, keeps the 16-channel
    # stem and narrows nothing but the blocks (pre_head only widens, for α > 1).
    keras_widths: bool = False
    minimalistic: bool = False  # Keras's: 3×3 depthwise kernels, ReLU only, no squeeze-excite
    padding: str = "torch"
    bn_eps: float = TF_BN_EPS
    bn_momentum: float = TF_BN_MOMENTUM
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.2
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("stem", *(f"block{i + 1}" for i in range(len(self.setting))), "features_last",
                "pre_head", "head")

    @property
    def act(self) -> layers.Activation:
        """The activation of the stem, the final conv and the pre-head."""
        return nn.relu if self.minimalistic else layers.hard_swish

    def block_specs(self) -> list[BlockSpec]:
        width = functools.partial(_scaled, multiplier=self.width_mult)
        specs, unscaled_in = [], 16
        in_features = 16 if self.keras_widths else width(16)
        for kernel, expanded, out, se, act, stride in self.setting:
            if self.keras_widths:
                expanded = layers.make_divisible(in_features * expanded / unscaled_in)
            else:
                expanded = width(expanded)
            if self.minimalistic:
                kernel, se, act = 3, False, nn.relu
            se_channels = layers.make_divisible(expanded // 4) if se else 0
            specs.append(BlockSpec(in_features, width(out), expanded, kernel, stride, act,
                                   se_channels, se_gate=layers.hard_sigmoid))
            in_features, unscaled_in = width(out), out
        return specs

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        specs = self.block_specs()
        x = inverted_residual_features(self, x, specs, self.act, 6 * specs[-1].features, train)
        multiplier = max(1.0, self.width_mult) if self.keras_widths else self.width_mult
        x = layers.Dense(_scaled(self.pre_head_features, multiplier), act=self.act,
                         dtype=self.dtype, name="pre_head")(layers.global_avg_pool(x))
        if pre_logits:
            return x
        return layers.ClassifierHead(self.num_classes, dropout=self.dropout, dtype=self.dtype,
                                     name="head")(x, train)


# Output channels and stride of Keras's 13 depthwise-separable blocks.
V1_SETTING = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
              (1024, 2), (1024, 1))


class DepthwiseSeparable(nn.Module):
    """3×3 depthwise ConvBN-ReLU6 → 1×1 pointwise ConvBN-ReLU6, without shortcut."""

    features: int
    strides: int = 1
    padding: str = "same"
    bn_eps: float = TF_BN_EPS
    bn_momentum: float = TF_BN_MOMENTUM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv_bn = functools.partial(layers.ConvBN, act=jax.nn.relu6, **conv_options(self))
        # Keras pads strided depthwise convs by (0, 1): SAME on even sizes, one less on odd.
        pad = ((0, 1), (0, 1)) if self.padding == "same" and self.strides > 1 else self.padding
        channels = x.shape[-1]
        x = conv_bn(channels, 3, self.strides, groups=channels, padding=pad,
                    name="depthwise")(x, train)
        return conv_bn(self.features, 1, name="pointwise")(x, train)


class MobileNetV1(nn.Module):
    """Keras's MobileNet: 3×3 stride-2 ``stem``, 13 depthwise-separable blocks, global pool,
    dropout and the classifier (a 1×1 conv in Keras, the ``head`` Dense here)."""

    alpha: float = 1.0  # width multiplier
    padding: str = "same"
    bn_eps: float = TF_BN_EPS
    bn_momentum: float = TF_BN_MOMENTUM
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 1e-3
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("stem", *(f"block{i + 1}" for i in range(len(V1_SETTING))), "head")

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = layers.ConvBN(int(32 * self.alpha), 3, 2, act=jax.nn.relu6, **conv_options(self),
                          name="stem")(x, train)
        for i, (features, strides) in enumerate(V1_SETTING, start=1):
            x = DepthwiseSeparable(int(features * self.alpha), strides, **conv_options(self),
                                   name=f"block{i}")(x, train)
        x = layers.global_avg_pool(x)
        if pre_logits:
            return x
        return layers.ClassifierHead(self.num_classes, dropout=self.dropout, dtype=self.dtype,
                                     name="head")(x, train)


MobileNetV3Large = functools.partial(MobileNetV3, setting=V3_LARGE, pre_head_features=1280)
MobileNetV3Small = functools.partial(MobileNetV3, setting=V3_SMALL, pre_head_features=1024)

register("mobilenet_v1", MobileNetV1, input_size=224, min_size=32)
register("mobilenet_v2", MobileNetV2, input_size=224, min_size=32, torchvision="mobilenet_v2")
register("mobilenet_v3_large", MobileNetV3Large, input_size=224, min_size=32,
         torchvision="mobilenet_v3_large")
register("mobilenet_v3_small", MobileNetV3Small, input_size=224, min_size=32,
         torchvision="mobilenet_v3_small")
