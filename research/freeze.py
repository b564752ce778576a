"""Which parameters train: a freeze spec resolved into a label per parameter path.

A spec is ``depth`` (the first n of ``model.blocks``) and/or ``regex`` (patterns matched in full
against paths such as ``stage1/block0/conv1/kernel``). Frozen parameters get no gradient, no
optimizer state and no update; frozen BatchNorm layers normalise with their running statistics
and leave them unchanged; and the backward pass stops at the end of the frozen prefix.

``bn_policy`` sets what trainable BatchNorm layers normalise with in training: ``"batch"``
(batch statistics, updating the running ones: the default) or ``"frozen"`` (their running
statistics, left unchanged, while their scale and bias still train: Keras's transfer-learning
guide, which calls the base model with ``training=False``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax

from research import tree
from research.errors import ConfigError

FROZEN = "frozen"
TRAINABLE = "trainable"
BN_POLICIES = ("batch", "frozen")


@dataclasses.dataclass(frozen=True)
class FreezePlan:
    labels: Mapping[str, str]  # parameter path → FROZEN or TRAINABLE
    blocks: tuple[str, ...]
    bn_policy: str = "batch"  # what trainable BatchNorm normalises with: see BN_POLICIES

    @property
    def frozen_paths(self) -> list[str]:
        return [p for p, label in self.labels.items() if label == FROZEN]

    @property
    def frozen_prefix(self) -> tuple[str, ...]:
        """The leading blocks whose every parameter is frozen: no gradient flows into them."""
        prefix = []
        for block in self.blocks:
            block_labels = [l for p, l in self.labels.items() if p.split("/", 1)[0] == block]
            if not block_labels or any(l != FROZEN for l in block_labels):
                break
            prefix.append(block)
        return tuple(prefix)

    @property
    def frozen_modules(self) -> frozenset[str]:
        """Module paths all of whose parameters are frozen (BatchNorm layers among them)."""
        by_module: dict[str, list[str]] = {}
        for path, label in self.labels.items():
            by_module.setdefault(path.rpartition("/")[0], []).append(label)
        return frozenset(m for m, labels in by_module.items() if all(l == FROZEN for l in labels))

    def trainable_count(self, params) -> int:
        flat = tree.flatten(params)
        return sum(int(flat[p].size) for p, label in self.labels.items() if label == TRAINABLE)

    def split(self, params) -> tuple[dict, dict]:
        """``(trainable, frozen)`` flat dicts of ``params``."""
        flat = tree.flatten(params)
        trainable = {p: v for p, v in flat.items() if self.labels[p] == TRAINABLE}
        frozen = {p: v for p, v in flat.items() if self.labels[p] == FROZEN}
        return trainable, frozen

    def label_tree(self, params):
        return tree.unflatten({p: self.labels[p] for p in tree.flatten(params)})


def resolve(spec, model: nn.Module, params) -> FreezePlan:
    """Label every parameter of ``params`` by ``spec.depth`` and ``spec.regex`` (a union)."""
    blocks = tuple(model.blocks)
    paths = list(tree.flatten(params))
    frozen = set(_paths_in_blocks(paths, _frozen_blocks(spec.get("depth", 0) or 0, blocks, model)))
    for pattern in spec.get("regex", ()) or ():
        frozen |= set(paths_matching(paths, pattern))
    bn_policy = spec.get("bn_policy", "batch")
    if bn_policy not in BN_POLICIES:
        raise ConfigError(f"freeze.bn_policy={bn_policy!r} is unknown; use one of {BN_POLICIES}.")
    return FreezePlan({p: FROZEN if p in frozen else TRAINABLE for p in paths}, blocks, bn_policy)


def _frozen_blocks(depth: int, blocks: Sequence[str], model: nn.Module) -> Sequence[str]:
    if not 0 <= depth < len(blocks):
        raise ConfigError(
            f"freeze.depth={depth} is out of range for {type(model).__name__}, whose "
            f"{len(blocks)} blocks are {', '.join(blocks)}: use 0 (train everything) to "
            f"{len(blocks) - 1} (train only {blocks[-1]!r}).")
    return blocks[:depth]


def _paths_in_blocks(paths: Sequence[str], blocks: Sequence[str]) -> list[str]:
    return [p for p in paths if p.split("/", 1)[0] in set(blocks)]


def paths_matching(paths: Sequence[str], pattern: str, field: str = "freeze.regex") -> list[str]:
    """The ``paths`` that ``pattern`` matches in full; a ``ConfigError`` naming ``field`` where
    the pattern is invalid or matches none."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{field} {pattern!r} is not a valid regular expression: {e}.") from None
    matched = [p for p in paths if compiled.fullmatch(p)]
    if not matched:
        raise ConfigError(
            f"{field} {pattern!r} matches no parameter path (it must match a whole path). "
            f"Paths look like: {', '.join(paths[:3])}, …; see research.tree.flatten(params).")
    return matched


@contextlib.contextmanager
def frozen_behaviour(plan: FreezePlan, prefix_output=None):
    """While tracing the model: frozen BatchNorm (all BatchNorm with ``bn_policy="frozen"``)
    uses running statistics (and leaves them unchanged), and the output of the frozen prefix
    carries no gradient. Given ``prefix_output`` (its cached value), the frozen prefix is not computed: its last block
    returns that, and XLA drops the blocks before it, whose outputs nothing reads then."""
    frozen_modules = plan.frozen_modules
    every_batch_norm = plan.bn_policy == "frozen"
    last_of_prefix = plan.frozen_prefix[-1] if plan.frozen_prefix else None

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.is_initializing():
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        running = every_batch_norm or path in frozen_modules
        # path is empty inside the running-statistics layer's own apply
        if isinstance(module, nn.BatchNorm) and path and running:
            return _batch_norm_with_running_statistics(module, args[0])
        if path != last_of_prefix:
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs) if prefix_output is None else prefix_output
        return jax.tree.map(jax.lax.stop_gradient, out)

    with nn.intercept_methods(interceptor):
        yield


def _batch_norm_with_running_statistics(module: nn.BatchNorm, x):
    inference = module.clone(parent=None, use_running_average=True)
    return inference.apply({k: module.variables[k] for k in ("params", "batch_stats")
                            if k in module.variables}, x)
