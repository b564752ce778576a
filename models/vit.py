"""Vision Transformer (Dosovitskiy et al., 2020): class token, learned position embedding,
pre-norm encoder blocks (LayerNorm epsilon 1e-6, exact GELU, MLP ratio 4).

Blocks: ``embed`` (patch conv, class token, position embedding), ``block00`` … ``block11``
(``block23`` for ViT-L), ``norm``, ``head``. Paths: ``embed/patch/kernel``, ``embed/cls_token``,
``embed/pos_embedding``, ``block03/ln1/scale``, ``block03/attn/{query,key,value,out}/kernel``
(as Flax's ``MultiHeadDotProductAttention``'s: ``(width, heads, head_dim)``, as in Google's
checkpoints), ``block03/mlp/fc1/kernel``, ``norm/scale``, ``head/kernel``.

The head reads the class token alone, so the last block computes that token's output alone
(its attention's keys and values from all tokens): the same logits and gradients, without the
other tokens' queries, attention output, projection and MLP (ViT-S/16: 7% of a step's flops).

The position embedding's length is fixed when the model is initialised, by the input's grid of
patches; any input whose sides are multiples of the patch size works, but applying the model
to another grid than it was initialised with is an error.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from models import layers, ops
from models.registry import register

LN_EPS = 1e-6

# The ViT paper's model sizes (plus DeiT's "Ti"); every one has 64-dimensional heads.
SIZES = {
    "ti": dict(width=192, depth=12, num_heads=3),
    "s": dict(width=384, depth=12, num_heads=6),
    "b": dict(width=768, depth=12, num_heads=12),
    "l": dict(width=1024, depth=24, num_heads=16),
}

# torchvision's and Google's initialisers.
xavier_init = nn.initializers.xavier_uniform()
mlp_bias_init = nn.initializers.normal(1e-6)
pos_embedding_init = nn.initializers.normal(0.02)


class Embedding(nn.Module):
    """Patches → tokens, with the class token first, plus the position embedding."""

    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.Conv(self.width, self.patch_size, self.patch_size, padding="valid",
                        use_bias=True, dtype=self.dtype, kernel_init=nn.initializers.lecun_normal(),
                        name="patch")(x)
        batch, grid = x.shape[0], x.shape[1:3]
        x = x.reshape(batch, -1, self.width)
        cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
        cls_tokens = jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, self.width))
        x = jnp.concatenate([cls_tokens, x], axis=1)
        return ops.add_to_each_image(x, self.position_embedding(grid).astype(x.dtype))

    def position_embedding(self, grid: tuple[int, int]):
        """The learned embedding of the class token and a ``grid`` of patches, row by row."""
        length = grid[0] * grid[1] + 1
        if self.has_variable("params", "pos_embedding"):
            learned = self.get_variable("params", "pos_embedding").shape[1]
            if learned != length:
                raise ValueError(
                    f"the position embedding was learned for {learned - 1} patches, but this "
                    f"input has {grid[0]}×{grid[1]} patches of {self.patch_size}×"
                    f"{self.patch_size} pixels: use the resolution the weights were trained at, "
                    "or load them with init.checkpoint into a model at the new resolution, "
                    "which resamples the embedding.")
        return self.param("pos_embedding", pos_embedding_init, (1, length, self.width))


class Mlp(nn.Module):
    hidden: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = x.shape[-1]
        kernel, bias = Projection((width,), (self.hidden,), mlp_bias_init, name="fc1")()
        x = layers.bias_gelu(product(x, kernel, self.dtype), bias.astype(self.dtype))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(width, dtype=self.dtype, kernel_init=xavier_init, bias_init=mlp_bias_init,
                     dot_general=ops.dot_general, name="fc2")(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class Projection(nn.Module):
    """The kernel (``in_shape + out_shape``) and bias (``out_shape``) of a Flax
    ``DenseGeneral`` with those shapes: same names, initialised alike (on the flattened
    matrix), returned for the caller to apply."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self):
        def kernel_init(rng, shape, dtype=jnp.float32):
            matrix = (math.prod(self.in_shape), math.prod(self.out_shape))
            return xavier_init(rng, matrix, dtype).reshape(shape)
        return (self.param("kernel", kernel_init, self.in_shape + self.out_shape),
                self.param("bias", self.bias_init, self.out_shape))


def product(x, kernel, dtype):
    """x·kernel over x's last axis, for a (fan-in, fan-out) ``kernel``."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    return ops.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def dense(x, kernel, bias, dtype):
    """x·kernel + bias over x's last axis, for a (fan-in, fan-out) ``kernel``."""
    return product(x, kernel, dtype) + bias.astype(dtype)


class SelfAttention(nn.Module):
    """Flax's ``MultiHeadDotProductAttention`` as a ViT applies it (self-attention, no mask),
    with its variables (``query``, ``key``, ``value``, ``out``: kernel and bias), but q, k and v
    from one product with their kernels side by side, which ``ops.self_attention`` reads in
    place, adding the biases on the way: one product each way instead of three, and no copies
    or bias pass between them.

    With ``class_token_only``, only the first token (the class token) queries: the output is
    that token's alone, and q is computed for it alone."""

    num_heads: int
    dropout_rate: float = 0.0  # on the attention weights
    class_token_only: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = x.shape[-1]
        heads = (self.num_heads, width // self.num_heads)
        kernels, biases = zip(*(Projection((width,), heads, name=name)()
                                for name in ("query", "key", "value")))
        first = 1 if self.class_token_only else 0  # then q is the class token's alone
        projected = product(
            x, jnp.concatenate([k.reshape(width, -1) for k in kernels[first:]], axis=1),
            self.dtype).reshape(*x.shape[:-1], 3 - first, *heads)
        bias = jnp.stack(biases[first:]).astype(self.dtype)
        if self.class_token_only:
            query = dense(x[:, :1], kernels[0].reshape(width, -1), biases[0].reshape(-1),
                          self.dtype).reshape(x.shape[0], 1, *heads)
            kv = projected + bias
            y = self.attend(query, kv[:, :, 0], kv[:, :, 1], train)
        elif train and self.dropout_rate > 0.0:
            qkv = projected + bias
            y = self.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], train)
        else:
            y = ops.self_attention(projected, bias)
        kernel, bias = Projection(heads, (width,), name="out")()
        return dense(y.reshape(*y.shape[:2], width), kernel.reshape(-1, width), bias, self.dtype)

    def attend(self, query, key, value, train: bool):
        dropout = train and self.dropout_rate > 0.0
        return nn.dot_product_attention(
            query, key, value, dropout_rng=self.make_rng("dropout") if dropout else None,
            dropout_rate=self.dropout_rate, broadcast_dropout=False, deterministic=not dropout,
            dtype=self.dtype)


class EncoderBlock(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)); with ``class_token_only``, for
    the first token (the class token) alone, all tokens still its attention's keys and values:
    the last block of a model whose head reads that token, which computes nothing else."""

    num_heads: int
    mlp_dim: int
    attention_dropout: float = 0.0
    encoder_dropout: float = 0.0
    class_token_only: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(layers.LayerNorm, epsilon=LN_EPS, dtype=self.dtype)
        y = norm(name="ln1")(x)
        y = SelfAttention(self.num_heads, self.attention_dropout, self.class_token_only,
                          self.dtype, name="attn")(y, train)
        if self.class_token_only:
            x = x[:, :1]
        x = x + nn.Dropout(self.encoder_dropout, deterministic=not train)(y)
        y = norm(name="ln2")(x)
        return x + Mlp(self.mlp_dim, self.encoder_dropout, self.dtype, name="mlp")(y, train)


class VisionTransformer(nn.Module):
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: int = 4
    attention_dropout: float = 0.0  # on the attention weights
    encoder_dropout: float = 0.0  # after the position embedding, attention and MLP layers
    num_classes: int = 1000
    in_chans: int = 3
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("embed", *(f"block{i:02d}" for i in range(self.depth)), "norm", "head")

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = Embedding(self.patch_size, self.width, self.dtype, name="embed")(x)
        x = nn.Dropout(self.encoder_dropout, deterministic=not train)(x)
        for i in range(self.depth):
            block = EncoderBlock(self.num_heads, self.mlp_ratio * self.width,
                                 self.attention_dropout, self.encoder_dropout,
                                 class_token_only=i == self.depth - 1, dtype=self.dtype,
                                 name=f"block{i:02d}")
            x = block(x, train)
        x = layers.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)[:, 0]
        if pre_logits:
            return x
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                        name="head")(x)


def _variant(size: str, patch_size: int):
    return functools.partial(VisionTransformer, patch_size=patch_size, **SIZES[size])


ViT_Ti16 = _variant("ti", 16)
ViT_S16 = _variant("s", 16)
ViT_S32 = _variant("s", 32)
ViT_B16 = _variant("b", 16)
ViT_B32 = _variant("b", 32)
ViT_L16 = _variant("l", 16)
ViT_L32 = _variant("l", 32)

for _name, _factory, _torchvision in [
        ("vit_ti16", ViT_Ti16, None), ("vit_s16", ViT_S16, None), ("vit_s32", ViT_S32, None),
        ("vit_b16", ViT_B16, "vit_b_16"), ("vit_b32", ViT_B32, "vit_b_32"),
        ("vit_l16", ViT_L16, "vit_l_16"), ("vit_l32", ViT_L32, "vit_l_32")]:
    register(_name, _factory, input_size=224, min_size=_factory.keywords["patch_size"],
             torchvision=_torchvision)
