"""Google's ViT checkpoints (``.npz`` of the vision_transformer / AugReg releases) → transferlab.

Their arrays are Flax's, so only the names change: ``embedding`` → ``embed/patch``, ``cls`` →
``embed/cls_token``, ``Transformer/posembed_input/pos_embedding`` → ``embed/pos_embedding``,
``Transformer/encoderblock_3/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3/Dense_0, MlpBlock_3/Dense_1}`` → ``block03/{ln1, attn, ln2, mlp/fc1, mlp/fc2}``,
``Transformer/encoder_norm`` → ``norm``, ``head`` → ``head``. The position embedding's length
fixes the grid of patches, hence the image size the model is built for (384 for the
``*-384`` fine-tunings).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

import models
from research import tree
from research.convert import common
from research.errors import CheckpointError, mismatch_report

# Our variable paths → the checkpoint's array names.
_RULES = (
    (r"^params/", ""),
    (r"^embed/patch/", "embedding/"),
    (r"^embed/cls_token$", "cls"),
    (r"^embed/pos_embedding$", "Transformer/posembed_input/pos_embedding"),
    (r"^block0?(\d+)/", r"Transformer/encoderblock_\1/"),
    (r"/ln1/", "/LayerNorm_0/"),
    (r"/attn/", "/MultiHeadDotProductAttention_1/"),
    (r"/ln2/", "/LayerNorm_2/"),
    (r"/mlp/fc1/", "/MlpBlock_3/Dense_0/"),
    (r"/mlp/fc2/", "/MlpBlock_3/Dense_1/"),
    (r"^norm/", "Transformer/encoder_norm/"),
)
POS_EMBEDDING = "Transformer/posembed_input/pos_embedding"


def supported() -> list[str]:
    return models.list_models("vit_*")


def options(arch: str, weights: dict | None = None) -> dict:
    return {}


def preprocessing(arch: str, weights: dict[str, np.ndarray] | None = None) -> dict:
    """Google's ViTs take inputs scaled to [-1, 1], resized (bilinear) to the size their
    position embedding was learned for: 224 px, or, given a ``*-384`` file's arrays, 384."""
    size = models.model_info(arch).input_size
    if weights is not None:
        patch_size = models.create(arch, num_classes=1000).patch_size
        size = image_size(weights, patch_size, size)
    return dict(input_size=size, interpolation="bilinear", mean=[127.5] * 3, std=[127.5] * 3,
                channel_order="RGB")


def read(path: str | Path) -> dict[str, np.ndarray]:
    """The ``.npz`` file's arrays by name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. Pass the path of a ViT .npz checkpoint.")
    try:
        with np.load(path) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable .npz file ({e}). It may be truncated: "
                              "download it again.") from None


def image_size(arrays: dict[str, np.ndarray], patch_size: int, default: int) -> int:
    """The side of the square images whose patch grid the position embedding (class token
    first) was learned for; ``default`` without one."""
    pos_embedding = arrays.get(POS_EMBEDDING)
    if pos_embedding is None or pos_embedding.ndim != 3:
        return default  # fit_to then reports it
    return math.isqrt(pos_embedding.shape[1] - 1) * patch_size


def convert_weights(arrays: dict[str, np.ndarray], arch: str, *, num_classes: int = 1000,
                    source: str = "arrays") -> tuple[object, dict]:
    """``(model, variables)`` for our ``arch`` with the weights of the checkpoint's arrays."""
    if arch not in supported():
        raise CheckpointError(f"no ViT .npz converter for {arch!r}; converters exist for "
                              f"{supported()}")
    model = models.create(arch, num_classes=num_classes)
    size = image_size(arrays, model.patch_size, models.model_info(arch).input_size)
    shapes = {p: s.shape for p, s in tree.flatten(models.variable_shapes(model, size)).items()}
    names = {path: common.rename(path, _RULES) for path in shapes}
    missing = [name for name in names.values() if name not in arrays]
    unexpected = set(arrays) - set(names.values())
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit transferlab's {arch}: is it a checkpoint of another ViT "
            "(or of one with a pre_logits layer), or truncated?\n"
            + mismatch_report(missing, unexpected))
    return model, common.fit_to(shapes, {path: arrays[name] for path, name in names.items()},
                                source, f"transferlab's {arch}")
