"""Vision Transformer (Dosovitskiy et al., 2020): class token, learned position embedding,
pre-norm encoder blocks (LayerNorm epsilon 1e-6, exact GELU, MLP ratio 4), as big_vision's
``models/vit.py`` and torchvision's ``VisionTransformer``.

Blocks: ``embed`` (patch conv, class token, position embedding), ``block00`` … ``block11``
(``block23`` for ViT-L), ``norm``, ``head``. Paths: ``embed/patch/kernel``, ``embed/cls_token``,
``embed/pos_embedding``, ``block03/ln1/scale``, ``block03/attn/{query,key,value,out}/kernel``
(as Flax's ``MultiHeadDotProductAttention``'s: ``(width, heads, head_dim)``, as in Google's
checkpoints), ``block03/mlp/fc1/kernel``, ``norm/scale``, ``head/kernel``.

The head reads the class token alone, so the last block computes that token's output alone
(its attention's keys and values from all tokens): the same logits and gradients, without the
other tokens' queries, attention output, projection and MLP.

The position embedding's length is fixed when the model is initialised, by the input's grid of
patches; any input whose sides are multiples of the patch size works, but applying the model
to another grid than it was initialised with is an error.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models import layers
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
        return layers.add_position_embedding(x, self.position_embedding(grid))

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
    """fc1 → GELU → dropout → fc2 → dropout."""

    hidden: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        dense = functools.partial(layers.Dense, kernel_init=xavier_init, bias_init=mlp_bias_init,
                                  dtype=self.dtype)
        width = x.shape[-1]
        x = dense(self.hidden, act=layers.gelu, name="fc1")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = dense(width, name="fc2")(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


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
        y = layers.MultiHeadSelfAttention(
            self.num_heads, dropout_rate=self.attention_dropout,
            class_token_only=self.class_token_only, kernel_init=xavier_init, dtype=self.dtype,
            name="attn")(y, train)
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
        return layers.ClassifierHead(self.num_classes, kernel_init=nn.initializers.zeros,
                                     dropout=self.dropout, dtype=self.dtype, name="head")(x, train)


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
