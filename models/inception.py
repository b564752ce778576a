"""GoogLeNet (Inception v1, Szegedy et al., 2014) and Inception v3 (Szegedy et al., 2015) in
torchvision's layout: every convolution is ``BasicConv2d`` (conv without bias → BatchNorm with
epsilon 1e-3 → ReLU), i.e. ``layers.ConvBN`` with ``bn_eps=1e-3``.

Blocks (the optional auxiliary heads sit where they branch off):

- ``googlenet``: ``stem`` (conv1 … conv3), ``inception3a``, ``inception3b``, ``inception4a``,
  [``aux1``], ``inception4b``, ``inception4c``, ``inception4d``, [``aux2``], ``inception4e``,
  ``inception5a``, ``inception5b``, ``head``.
- ``inception_v3``: ``stem`` (Conv2d_1a_3x3 … Conv2d_4a_3x3), ``Mixed_5b`` … ``Mixed_6e``,
  [``AuxLogits``], ``Mixed_7a``, ``Mixed_7b``, ``Mixed_7c``, ``head``.

Parameter paths are torchvision's with the stem convs grouped under ``stem``, ``fc`` renamed
``head`` and GoogLeNet's ``nn.Sequential`` indices joined to the branch name
(``inception3a.branch2.1.conv`` → ``inception3a/branch2_1/conv``).

Auxiliary heads (``aux_logits``) run only with ``train=True``, where the model then returns
torchvision's named tuples: ``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)`` and
``InceptionOutputs(logits, aux_logits)``; otherwise (and with ``pre_logits``) it returns one array.
``transform_input`` maps ImageNet-normalised inputs to the [-1, 1] range the ported weights were
trained on, as torchvision does whenever it loads its ImageNet weights.

Keras's InceptionV3 is ``inception_v3`` with ``aux_logits=False`` and
``count_include_pad=False``: its 3×3 average pools ("same" padding) do not count the padding.
Its BatchNorms have no scale (γ): converted, they get γ = 1.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.registry import register

BasicConv = functools.partial(layers.ConvBN, bn_eps=1e-3)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GoogLeNetOutputs(NamedTuple):
    logits: jax.Array
    aux_logits2: jax.Array
    aux_logits1: jax.Array


class InceptionOutputs(NamedTuple):
    logits: jax.Array
    aux_logits: jax.Array


def imagenet_to_unit_range(x):
    """torchvision's ``transform_input``: undo the ImageNet mean/std normalisation and rescale
    to [-1, 1], i.e. ``(x · std + mean − 0.5) / 0.5`` per RGB channel."""
    if x.shape[-1] != 3:
        raise ValueError(f"transform_input expects RGB inputs, got {x.shape[-1]} channels")
    std, mean = jnp.asarray(IMAGENET_STD), jnp.asarray(IMAGENET_MEAN)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


def aux_heads_run(model: nn.Module, train: bool) -> bool:
    """Auxiliary heads run in training, and at initialisation so that their parameters exist."""
    return model.aux_logits and (train or model.is_initializing())


def classify(model: nn.Module, x, train: bool, pre_logits: bool):
    """Global average pool → the ``head`` (dropout, Dense), as both torchvision models end."""
    x = layers.global_avg_pool(x)
    if pre_logits:
        return x
    return layers.ClassifierHead(model.num_classes, dropout=model.dropout, dtype=model.dtype,
                                 name="head")(x, train)


# ----------------------------------------------------------------------------- GoogLeNet

# Output channels: 1×1, 3×3 reduce, 3×3, "5×5" reduce, "5×5", pool projection.
GOOGLENET_MODULES = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class InceptionV1Module(nn.Module):
    """Four parallel branches: 1×1; 1×1 → 3×3; 1×1 → "5×5"; 3×3 max-pool → 1×1."""

    channels: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj = self.channels
        conv = functools.partial(BasicConv, dtype=self.dtype)
        branch1 = conv(ch1x1, 1, name="branch1")(x, train)
        branch2 = conv(ch3x3red, 1, name="branch2_0")(x, train)
        branch2 = conv(ch3x3, 3, name="branch2_1")(branch2, train)
        branch3 = conv(ch5x5red, 1, name="branch3_0")(x, train)
        # torchvision's "5×5" branch is 3×3 (pytorch/vision#906); its weights need it.
        branch3 = conv(ch5x5, 3, name="branch3_1")(branch3, train)
        branch4 = layers.max_pool(x, 3, 1, padding=1, ceil_mode=True)
        branch4 = conv(pool_proj, 1, name="branch4_1")(branch4, train)
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class GoogLeNetAux(nn.Module):
    """4×4 adaptive average pool → 1×1 conv → fc1 → ReLU → dropout → fc2."""

    num_classes: int
    dropout: float = 0.7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = layers.adaptive_avg_pool(x, 4)
        x = BasicConv(128, 1, dtype=self.dtype, name="conv")(x, train)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch's channel-major flatten
        x = layers.Dense(1024, act=nn.relu, dtype=self.dtype, name="fc1")(x)
        return layers.ClassifierHead(self.num_classes, dropout=self.dropout, dtype=self.dtype,
                                     name="fc2")(x, train)


class GoogLeNetStem(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv, dtype=self.dtype)
        x = conv(64, 7, 2, name="conv1")(x, train)
        x = layers.max_pool(x, 3, 2, ceil_mode=True)
        x = conv(64, 1, name="conv2")(x, train)
        x = conv(192, 3, name="conv3")(x, train)
        return layers.max_pool(x, 3, 2, ceil_mode=True)


class GoogLeNet(nn.Module):
    aux_logits: bool = False
    aux_dropout: float = 0.7
    transform_input: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.2
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        aux1, aux2 = (("aux1",), ("aux2",)) if self.aux_logits else ((), ())
        return ("stem", "inception3a", "inception3b", "inception4a", *aux1, "inception4b",
                "inception4c", "inception4d", *aux2, "inception4e", "inception5a", "inception5b",
                "head")

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        if self.transform_input:
            x = imagenet_to_unit_range(x)
        x = GoogLeNetStem(self.dtype, name="stem")(x, train)
        x = self._inception(x, train, "inception3a", "inception3b")
        x = layers.max_pool(x, 3, 2, ceil_mode=True)
        x = self._inception(x, train, "inception4a")
        aux1 = self._aux(x, train, "aux1")
        x = self._inception(x, train, "inception4b", "inception4c", "inception4d")
        aux2 = self._aux(x, train, "aux2")
        x = self._inception(x, train, "inception4e")
        x = layers.max_pool(x, 2, 2, ceil_mode=True)
        x = self._inception(x, train, "inception5a", "inception5b")
        logits = classify(self, x, train, pre_logits)
        if self.aux_logits and train and not pre_logits:
            return GoogLeNetOutputs(logits, aux2, aux1)
        return logits

    def _inception(self, x, train: bool, *names: str):
        for name in names:
            x = InceptionV1Module(GOOGLENET_MODULES[name], self.dtype, name=name)(x, train)
        return x

    def _aux(self, x, train: bool, name: str):
        if not aux_heads_run(self, train):
            return None
        return GoogLeNetAux(self.num_classes, self.aux_dropout, self.dtype, name=name)(x, train)


# ----------------------------------------------------------------------------- Inception v3

def pool_3x3(module: nn.Module, x):
    """The 3×3 stride-1 average pool of a branch_pool, padded by 1."""
    return layers.avg_pool(x, 3, 1, padding=1, count_include_pad=module.count_include_pad)


class InceptionA(nn.Module):
    """35×35 module: 1×1; 1×1 → 5×5; 1×1 → 3×3 → 3×3; 3×3 average pool → 1×1."""

    pool_features: int
    count_include_pad: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv, dtype=self.dtype)
        branch1x1 = conv(64, 1, name="branch1x1")(x, train)
        branch5x5 = conv(48, 1, name="branch5x5_1")(x, train)
        branch5x5 = conv(64, 5, name="branch5x5_2")(branch5x5, train)
        branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x, train)
        branch3x3dbl = conv(96, 3, name="branch3x3dbl_2")(branch3x3dbl, train)
        branch3x3dbl = conv(96, 3, name="branch3x3dbl_3")(branch3x3dbl, train)
        branch_pool = conv(self.pool_features, 1, name="branch_pool")(pool_3x3(self, x), train)
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """35×35 → 17×17 reduction: strided 3×3; 1×1 → 3×3 → strided 3×3; 3×3 max-pool."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv, dtype=self.dtype)
        branch3x3 = conv(384, 3, 2, padding="valid", name="branch3x3")(x, train)
        branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x, train)
        branch3x3dbl = conv(96, 3, name="branch3x3dbl_2")(branch3x3dbl, train)
        branch3x3dbl = conv(96, 3, 2, padding="valid", name="branch3x3dbl_3")(branch3x3dbl, train)
        return jnp.concatenate([branch3x3, branch3x3dbl, layers.max_pool(x, 3, 2)], axis=-1)


class InceptionC(nn.Module):
    """17×17 module with factorised 7×7 convolutions (1×7 and 7×1)."""

    channels_7x7: int
    count_include_pad: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv, dtype=self.dtype)
        c7 = self.channels_7x7
        branch1x1 = conv(192, 1, name="branch1x1")(x, train)
        branch7x7 = conv(c7, 1, name="branch7x7_1")(x, train)
        branch7x7 = conv(c7, (1, 7), name="branch7x7_2")(branch7x7, train)
        branch7x7 = conv(192, (7, 1), name="branch7x7_3")(branch7x7, train)
        branch7x7dbl = conv(c7, 1, name="branch7x7dbl_1")(x, train)
        for i, (features, kernel) in enumerate([(c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)),
                                                (192, (1, 7))], start=2):
            branch7x7dbl = conv(features, kernel, name=f"branch7x7dbl_{i}")(branch7x7dbl, train)
        branch_pool = conv(192, 1, name="branch_pool")(pool_3x3(self, x), train)
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """17×17 → 8×8 reduction: 1×1 → strided 3×3; 1×1 → 1×7 → 7×1 → strided 3×3; max-pool."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv, dtype=self.dtype)
        branch3x3 = conv(192, 1, name="branch3x3_1")(x, train)
        branch3x3 = conv(320, 3, 2, padding="valid", name="branch3x3_2")(branch3x3, train)
        branch7x7x3 = conv(192, 1, name="branch7x7x3_1")(x, train)
        branch7x7x3 = conv(192, (1, 7), name="branch7x7x3_2")(branch7x7x3, train)
        branch7x7x3 = conv(192, (7, 1), name="branch7x7x3_3")(branch7x7x3, train)
        branch7x7x3 = conv(192, 3, 2, padding="valid", name="branch7x7x3_4")(branch7x7x3, train)
        return jnp.concatenate([branch3x3, branch7x7x3, layers.max_pool(x, 3, 2)], axis=-1)


class InceptionE(nn.Module):
    """8×8 module whose 3×3 branches fan out into parallel 1×3 and 3×1 convolutions."""

    count_include_pad: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv, dtype=self.dtype)
        branch1x1 = conv(320, 1, name="branch1x1")(x, train)
        branch3x3 = conv(384, 1, name="branch3x3_1")(x, train)
        branch3x3 = [conv(384, (1, 3), name="branch3x3_2a")(branch3x3, train),
                     conv(384, (3, 1), name="branch3x3_2b")(branch3x3, train)]
        branch3x3dbl = conv(448, 1, name="branch3x3dbl_1")(x, train)
        branch3x3dbl = conv(384, 3, name="branch3x3dbl_2")(branch3x3dbl, train)
        branch3x3dbl = [conv(384, (1, 3), name="branch3x3dbl_3a")(branch3x3dbl, train),
                        conv(384, (3, 1), name="branch3x3dbl_3b")(branch3x3dbl, train)]
        branch_pool = conv(192, 1, name="branch_pool")(pool_3x3(self, x), train)
        return jnp.concatenate([branch1x1, *branch3x3, *branch3x3dbl, branch_pool], axis=-1)


class InceptionAux(nn.Module):
    """5×5/3 average pool → 1×1 conv → 5×5 conv → global average pool → fc."""

    num_classes: int
    dtype: Any = jnp.float32

    MIN_SIZE = 17  # the pooled map must hold the 5×5 conv: Mixed_6e maps of ≥ 17×17 (≥ 299 px)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if min(x.shape[1:3]) < self.MIN_SIZE:
            raise ValueError(f"inception_v3's AuxLogits head needs a Mixed_6e map of at least "
                             f"{self.MIN_SIZE}×{self.MIN_SIZE} (inputs of at least 299 px), got "
                             f"{x.shape[1]}×{x.shape[2]}: train smaller inputs with "
                             "aux_logits=False")
        x = layers.avg_pool(x, 5, 3)
        x = BasicConv(128, 1, dtype=self.dtype, name="conv0")(x, train)
        x = BasicConv(768, 5, padding="valid", dtype=self.dtype, name="conv1")(x, train)
        x = layers.global_avg_pool(x)
        return layers.ClassifierHead(self.num_classes, dtype=self.dtype, name="fc")(x)


class InceptionV3Stem(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(BasicConv, dtype=self.dtype)
        x = conv(32, 3, 2, padding="valid", name="Conv2d_1a_3x3")(x, train)
        x = conv(32, 3, padding="valid", name="Conv2d_2a_3x3")(x, train)
        x = conv(64, 3, name="Conv2d_2b_3x3")(x, train)
        x = layers.max_pool(x, 3, 2)
        x = conv(80, 1, name="Conv2d_3b_1x1")(x, train)
        x = conv(192, 3, padding="valid", name="Conv2d_4a_3x3")(x, train)
        return layers.max_pool(x, 3, 2)


class InceptionV3(nn.Module):
    aux_logits: bool = True
    transform_input: bool = False
    count_include_pad: bool = True  # in the 3×3 average pools: torchvision's True, Keras's False
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        aux = ("AuxLogits",) if self.aux_logits else ()
        return ("stem", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                "Mixed_6d", "Mixed_6e", *aux, "Mixed_7a", "Mixed_7b", "Mixed_7c", "head")

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        if self.transform_input:
            x = imagenet_to_unit_range(x)
        x = InceptionV3Stem(self.dtype, name="stem")(x, train)
        pad = self.count_include_pad
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, pad, self.dtype, name=name)(x, train)
        x = InceptionB(self.dtype, name="Mixed_6a")(x, train)
        for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                                   ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7, pad, self.dtype, name=name)(x, train)
        aux = self._aux(x, train)
        x = InceptionD(self.dtype, name="Mixed_7a")(x, train)
        x = InceptionE(pad, self.dtype, name="Mixed_7b")(x, train)
        x = InceptionE(pad, self.dtype, name="Mixed_7c")(x, train)
        logits = classify(self, x, train, pre_logits)
        if self.aux_logits and train and not pre_logits:
            return InceptionOutputs(logits, aux)
        return logits

    def _aux(self, x, train: bool):
        if not aux_heads_run(self, train):
            return None
        if not train:  # eval-mode init only creates the parameters, which fit any map size
            x = jnp.zeros((1, InceptionAux.MIN_SIZE, InceptionAux.MIN_SIZE, x.shape[-1]), x.dtype)
        return InceptionAux(self.num_classes, self.dtype, name="AuxLogits")(x, train)


register("googlenet", GoogLeNet, input_size=224, min_size=15, torchvision="googlenet")
register("inception_v3", InceptionV3, input_size=299, min_size=75, torchvision="inception_v3")
