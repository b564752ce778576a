"""Parameter trees as flat ``{"stage1/block0/conv1/kernel": array}`` dicts and back."""

from __future__ import annotations

from typing import Any, Mapping

import flax.traverse_util as traverse_util


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
