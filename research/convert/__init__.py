"""Converters from reference implementations' weights to transferlab checkpoints.

Each source is a module ``research/convert/<source>.py`` with ``read(path)`` (the weights
file's arrays by the source's names), ``convert_weights(weights, arch, *, num_classes, source)
-> (model, variables)``, ``options(arch, weights=None)`` (the model options its weights
imply), ``preprocessing(arch, weights=None)`` (keyword arguments of
``research.preprocess.make_spec``: how its weights expect their input), ``supported()`` (the
names it converts) and, where those are not all registry names, ``registry_name(arch)``. The
file is read once; given its arrays, ``options`` and ``preprocessing`` find what varies
between files of one architecture (Keras's MobileNet α and EfficientNet normalisation, a ViT's
image size).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from research import checkpoints, preprocess, pretrained
from research.errors import CheckpointError

SOURCES = ("torchvision", "timm", "keras", "vit_npz")


def source_module(source: str):
    if source not in SOURCES:
        raise CheckpointError(f"unknown source {source!r}; converters exist for {SOURCES}.")
    return importlib.import_module(f"research.convert.{source}")


def convert_file(source: str, input_path: str | Path, arch: str, *, num_classes: int = 1000):
    """``(model, variables)`` from the weights file of ``source``'s ``arch``."""
    return convert(source, arch, input_path, num_classes=num_classes)[:2]


def convert(source: str, arch: str, input_path: str | Path, *, num_classes: int = 1000):
    """``(model, variables, meta)`` from the weights file of ``source``'s ``arch``."""
    converter = source_module(source)
    weights = converter.read(input_path)
    model, variables = converter.convert_weights(weights, arch, num_classes=num_classes,
                                                 source=str(input_path))
    name = converter.registry_name(arch) if hasattr(converter, "registry_name") else arch
    meta = dict(model=pretrained.model_meta(name, model, converter.options(arch, weights)),
                preprocess=preprocess.make_spec(**converter.preprocessing(arch, weights)),
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
