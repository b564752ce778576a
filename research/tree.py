"""Parameter trees as flat ``{"stage1/block0/conv1/kernel": array}`` dicts and back, and their
canonical hash."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import flax.traverse_util as traverse_util
import numpy as np


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def sha256(tree: Mapping[str, Any]) -> str:
    """A canonical sha256 of a tree of arrays: over its paths in sorted order, each path with
    its array's dtype, shape and little-endian C-order bytes. Equal arrays under equal paths
    give the same hash whatever held them (a checkpoint, a safetensors file, device arrays)."""
    digest = hashlib.sha256()
    for path, value in sorted(flatten(tree).items()):
        array = np.ascontiguousarray(value)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{path}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
