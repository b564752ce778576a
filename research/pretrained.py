"""Starting from weights: load a checkpoint, and merge it into a model with a new head."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

import models
from research import checkpoints, preprocess, tree
from research.errors import CheckpointError, mismatch_report


@dataclasses.dataclass
class Pretrained:
    model: nn.Module
    variables: dict
    meta: dict

    def preprocess(self, images):
        """Raw RGB images in [0, 255] (NHWC) → this model's input."""
        return preprocess.apply(images, self.meta["preprocess"])


def model_meta(name: str, model: nn.Module, options: dict) -> dict:
    return dict(name=name, num_classes=model.num_classes, in_chans=model.in_chans,
                options=dict(options))


def model_from_meta(meta: dict, **changes) -> nn.Module:
    spec = {**meta["model"], **changes}
    return models.create(spec["name"], num_classes=spec["num_classes"],
                         in_chans=spec["in_chans"], **spec.get("options", {}))


def load(directory) -> Pretrained:
    """The model, variables and meta of the checkpoint in ``directory`` (a run's workdir or
    the output of ``scripts.convert``)."""
    variables, meta, _ = checkpoints.restore(directory)
    return Pretrained(model_from_meta(meta), dict(variables), meta)


def adapt_input_conv(kernel: np.ndarray, in_chans: int) -> np.ndarray:
    """An HWIO kernel for ``in_chans`` input channels from one for RGB (timm's rule): summed
    over the channels for one, repeated and rescaled by 3/in_chans for more."""
    if in_chans == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeats = math.ceil(in_chans / kernel.shape[2])
    return np.concatenate([kernel] * repeats, axis=2)[:, :, :in_chans] * (kernel.shape[2] / in_chans)


def resample_position_embedding(embedding: np.ndarray, length: int) -> np.ndarray:
    """``(1, 1 + g*g, D)`` → ``(1, length, D)``: the class token kept, the g×g grid resized
    bilinearly to the new square grid (as big_vision does)."""
    old_grid, new_grid = math.isqrt(embedding.shape[1] - 1), math.isqrt(length - 1)
    if old_grid ** 2 != embedding.shape[1] - 1 or new_grid ** 2 != length - 1:
        raise CheckpointError(f"cannot resample a position embedding of {embedding.shape[1]} "
                              f"tokens to {length}: only square patch grids are supported.")
    cls, grid = embedding[:, :1], embedding[:, 1:].reshape(1, old_grid, old_grid, -1)
    grid = jax.image.resize(grid, (1, new_grid, new_grid, grid.shape[-1]), method="bilinear")
    return np.concatenate([cls, np.asarray(grid).reshape(1, new_grid ** 2, -1)], axis=1)


def adapt(fresh: dict, loaded: dict, first_block: str | None) -> tuple[dict, list[str]]:
    """Fit ``loaded`` (flat) to ``fresh`` (flat) where a known rule applies: another number of
    input channels in the first block's kernel, or a position embedding for another grid."""
    adapted, notes = dict(loaded), []
    for path, value in fresh.items():
        old = loaded.get(path)
        if old is None or np.shape(old) == np.shape(value):
            continue
        new_shape, old_shape = np.shape(value), np.shape(old)
        if (path.endswith("pos_embedding") and len(new_shape) == 3
                and new_shape[::2] == old_shape[::2]):
            adapted[path] = resample_position_embedding(np.asarray(old), new_shape[1])
        elif (first_block and path.split("/")[1] == first_block and len(new_shape) == 4
              and new_shape[:2] + new_shape[3:] == old_shape[:2] + old_shape[3:]):
            adapted[path] = adapt_input_conv(np.asarray(old), new_shape[2])
        else:
            continue
        notes.append(f"{path}: {old_shape} → {new_shape}")
    return adapted, notes


def merge(fresh: dict, loaded: dict, dont_load: Sequence[str] = (), source: str = "checkpoint",
          first_block: str | None = None) -> tuple[dict, list[str]]:
    """``fresh`` variables with every path taken from ``loaded`` except those matching a
    ``dont_load`` regex (matched in full against ``stage1/block0/conv1/kernel``-style paths).

    The first block's input kernel adapts to another number of input channels and position
    embeddings to another patch grid (see ``adapt``). Returns the merged variables and the
    paths kept fresh. Any other missing, unexpected or mis-shaped path raises a
    CheckpointError that lists them all.
    """
    patterns = [re.compile(p) for p in dont_load]
    skipped = lambda path: any(p.fullmatch(path.split("/", 1)[1]) for p in patterns)
    fresh_flat = tree.flatten(fresh)
    loaded_flat, adapted = adapt(fresh_flat, tree.flatten(loaded), first_block)
    for note in adapted:
        logging.warning("adapted %s from %s", note, source)
    missing = [p for p in fresh_flat if p not in loaded_flat and not skipped(p)]
    unexpected = [p for p in loaded_flat if p not in fresh_flat and not skipped(p)]
    misshaped = [f"{p}: {np.shape(loaded_flat[p])} in {source}, {np.shape(v)} in the model"
                 for p, v in fresh_flat.items()
                 if p in loaded_flat and not skipped(p) and np.shape(loaded_flat[p]) != np.shape(v)]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{source} does not fit the model. Add regexes to init.dont_load for the paths that "
            "should stay freshly initialised, or check init.checkpoint and model.name:\n"
            + mismatch_report(missing, unexpected, misshaped))
    kept = [p for p in fresh_flat if skipped(p)]
    merged = {p: (fresh_flat[p] if skipped(p) else loaded_flat[p]) for p in fresh_flat}
    return tree.unflatten(merged), kept
