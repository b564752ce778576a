"""Starting from weights: load a checkpoint, and merge it into a model with a new head."""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import flax.linen as nn
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


def merge(fresh: dict, loaded: dict, dont_load: Sequence[str] = (), source: str = "checkpoint"
          ) -> tuple[dict, list[str]]:
    """``fresh`` variables with every path taken from ``loaded`` except those matching a
    ``dont_load`` regex (matched in full against ``stage1/block0/conv1/kernel``-style paths).

    Returns the merged variables and the paths kept fresh. Any other missing, unexpected or
    mis-shaped path raises a CheckpointError that lists them all.
    """
    patterns = [re.compile(p) for p in dont_load]
    skipped = lambda path: any(p.fullmatch(path.split("/", 1)[1]) for p in patterns)
    fresh_flat, loaded_flat = tree.flatten(fresh), tree.flatten(loaded)
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
