"""Reading reference weights and fitting them to a transferlab model."""

from __future__ import annotations

import importlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from research import tree
from research.errors import CheckpointError, mismatch_report

Rules = Iterable[tuple[str, str]]

# PyTorch's leaf names → (collection, Flax leaf name) for a tensor of the given rank.
_TORCH_LEAVES = {
    ("weight", 4): ("params", "kernel"),
    ("weight", 3): ("params", "kernel"),
    ("weight", 2): ("params", "kernel"),
    ("weight", 1): ("params", "scale"),
    ("bias", 1): ("params", "bias"),
    ("running_mean", 1): ("batch_stats", "mean"),
    ("running_var", 1): ("batch_stats", "var"),
}


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict from ``.safetensors`` (no torch needed) or a ``.pth`` of tensors only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. Pass the path of a .pth or .safetensors "
                              "state dict.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch_pickle(path)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e}). It may be "
                              "truncated: download or export it again.") from None


def _read_torch_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {path} needs PyTorch (pip install torch), or save the "
                              "state dict as .safetensors, which needs no torch.") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} refused: it holds Python objects besides tensors, and unpickling them "
            f"could run code ({str(e).splitlines()[0]}). Save only the state dict "
            "(torch.save(model.state_dict(), path)) or export it to .safetensors.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch file ({e}). It may be "
                              "truncated: download or export it again.") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in obj.items() if isinstance(v, torch.Tensor)}


def rename(key: str, rules: Rules) -> str:
    """Apply ordered ``(regex, replacement)`` rules to a reference key."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def torch_layout(module_path: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """``("stage1/block0/conv1", "weight", OIHW)`` → ``("params/stage1/…/kernel", HWIO)``."""
    try:
        collection, flax_leaf = _TORCH_LEAVES[(leaf, value.ndim)]
    except KeyError:
        raise CheckpointError(f"no rule converts {module_path}.{leaf} of shape "
                              f"{value.shape}") from None
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 3:  # Conv1d
        value = value.transpose(2, 1, 0)
    elif value.ndim == 2:
        value = value.T
    return f"{collection}/{module_path}/{flax_leaf}", value


def convert_torch(state_dict: Mapping[str, np.ndarray], rules: Rules,
                  special: Callable[[str, np.ndarray], dict[str, np.ndarray] | None] = None
                  ) -> dict[str, np.ndarray]:
    """Rename every key by ``rules`` and change layouts to Flax's.

    ``special(renamed_key, value)`` may claim a key by returning ``{flax_path: array}``
    (for tensors with no generic rule, such as a class token); ``None`` leaves it generic.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        renamed = rename(key, rules)
        claimed = special(renamed, value) if special else None
        if claimed is None:
            module_path, _, leaf = renamed.rpartition(".")
            claimed = dict([torch_layout(module_path.replace(".", "/"), leaf, value)])
        out.update(claimed)
    return out


def fit_to(shapes: Mapping[str, tuple], converted: Mapping[str, np.ndarray], source: str,
           target: str) -> dict:
    """Nested Flax variables from ``converted``, which must match ``shapes`` path for path."""
    missing = [p for p in shapes if p not in converted]
    unexpected = [p for p in converted if p not in shapes]
    misshaped = [f"{p}: {tuple(converted[p].shape)} in {source}, {tuple(shapes[p])} in {target}"
                 for p in shapes if p in converted and tuple(converted[p].shape) != tuple(shapes[p])]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{source} does not fit {target}: is it a state dict of another architecture or "
            f"variant?\n" + mismatch_report(missing, unexpected, misshaped))
    return tree.unflatten({p: np.asarray(converted[p], np.float32) for p in shapes})


def family_modules(source: str, families: Iterable[str]) -> list:
    """The modules ``research/convert/<source>_<family>.py``, each with its ``ARCHS``."""
    return [importlib.import_module(f"research.convert.{source}_{f}") for f in families]


def family_of(source: str, families: Iterable[str], arch: str):
    """The family module of ``source`` that converts ``arch``."""
    modules = family_modules(source, families)
    for module in modules:
        if arch in module.ARCHS:
            return module
    supported = sorted(name for module in modules for name in module.ARCHS)
    raise CheckpointError(f"no {source} converter for {arch!r}; converters exist for "
                          f"{supported}")
