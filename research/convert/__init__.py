"""Converters from reference implementations' weights to transferlab checkpoints."""

from __future__ import annotations

from pathlib import Path

from research import checkpoints, preprocess, pretrained
from research.errors import CheckpointError

SOURCES = ("torchvision",)


def convert(source: str, arch: str, input_path: str | Path, *, num_classes: int = 1000):
    """``(model, variables, meta)`` from the weights file of ``source``'s ``arch``."""
    if source != "torchvision":
        raise CheckpointError(f"unknown source {source!r}; converters exist for {SOURCES}.")
    from research.convert import torchvision
    model, variables = torchvision.convert_file(input_path, arch, num_classes=num_classes)
    meta = dict(model=pretrained.model_meta(arch, model, torchvision.options(arch)),
                preprocess=preprocess.make_spec(**torchvision.preprocessing(arch)),
                source=dict(library=source, arch=arch, file=str(input_path)),
                num_classes=num_classes)
    return model, variables, meta


def write(output: str | Path, variables: dict, meta: dict) -> Path:
    """Write a checkpoint that ``research.pretrained.load`` and ``init.checkpoint`` accept."""
    output = Path(output)
    if (output / checkpoints.SUBDIR).exists():
        raise CheckpointError(f"{output} already holds a checkpoint; choose another --output or "
                              "delete it first.")
    mngr = checkpoints.manager(output / checkpoints.SUBDIR, max_to_keep=None)
    checkpoints.save(mngr, 0, variables, meta)
    mngr.wait_until_finished()
    mngr.close()
    return output
