"""torchvision's Vision Transformers: ``encoder.layers.encoder_layer_3.self_attention`` →
``block03/attn``, its fused ``in_proj`` split into ``query``, ``key`` and ``value``."""

from __future__ import annotations

import math

import numpy as np

import models
from models import vit

ARCHS = ("vit_b16", "vit_b32", "vit_l16", "vit_l32")

_HEADS = {size["width"]: size["num_heads"] for size in vit.SIZES.values()}


def _heads(width: int) -> int:
    """Heads of our model of this width; no model has another width, so for one the single
    head gives a layout that ``fit_to`` reports as mis-shaped."""
    return _HEADS.get(width, 1)


def input_size_of(arch: str, weights: dict) -> int:
    """The image size the position embedding was learned at (its g×g patch grid × the patch
    size): 384 for torchvision's ``vit_b_16`` SWAG weights, 224 for its ImageNet-1k ones."""
    embedding = weights.get("encoder.pos_embedding")
    if embedding is None:  # not a ViT's state dict: fit_to lists what is missing
        return models.model_info(arch).input_size
    grid = math.isqrt(embedding.shape[1] - 1)
    return grid * models.model_info(arch).factory.keywords["patch_size"]


_RULES = (
    (r"^class_token$", "embed.cls_token"),
    (r"^conv_proj\.", "embed.patch."),
    (r"^encoder\.pos_embedding$", "embed.pos_embedding"),
    (r"\.ln_(\d)\.", r".ln\1."),
    (r"\.self_attention\.out_proj\.", ".attn.out."),
    (r"\.self_attention\.", ".attn."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
)


def rules(arch: str):
    blocks = tuple((rf"^encoder\.layers\.encoder_layer_{i}\.", f"block{i:02d}.")
                   for i in range(models.model_info(arch).factory.keywords["depth"]))
    return blocks + _RULES


def special(key: str, value: np.ndarray) -> dict[str, np.ndarray] | None:
    """Tokens as they are; attention projections in Flax's per-head layout."""
    module, _, leaf = key.rpartition(".")
    path = f"params/{module.replace('.', '/')}"
    if key in ("embed.cls_token", "embed.pos_embedding"):
        return {f"{path}/{leaf}": value}
    if leaf == "in_proj_weight":  # (3 * width, width), PyTorch's (out, in)
        width = value.shape[1]
        return {f"{path}/{name}/kernel": part.T.reshape(width, _heads(width), -1)
                for name, part in zip(("query", "key", "value"), np.split(value, 3))}
    if leaf == "in_proj_bias":
        width = value.shape[0] // 3
        return {f"{path}/{name}/bias": part.reshape(_heads(width), -1)
                for name, part in zip(("query", "key", "value"), np.split(value, 3))}
    if module.endswith(".attn.out") and leaf == "weight":
        width = value.shape[0]
        return {f"{path}/kernel": value.T.reshape(_heads(width), -1, width)}
    return None
