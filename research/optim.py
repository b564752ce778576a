"""Optimizers partitioned by freeze label: frozen parameters get ``optax.set_to_zero()``.

Clipping, weight decay and the schedule live inside the trainable partition, so nothing in the
chain ever reads a frozen gradient (which would pull the frozen backward pass back in).

Learning-rate multipliers per parameter (``optim.lr_mults``, ``optim.layer_decay``) scale each
parameter's final update, weight decay included: the per-parameter learning rate of PyTorch's
parameter groups, which timm's layer decay sets, and big_vision's ``lr_mults``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import optax

from research import tree
from research.errors import ConfigError
from research.freeze import FROZEN, TRAINABLE, FreezePlan, paths_matching

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def learning_rate(cfg, total_steps: int, lr: float | None = None) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then ``schedule`` (cosine or constant), to a
    peak of ``lr`` (default ``cfg.lr``)."""
    lr = cfg.lr if lr is None else lr
    warmup = min(int(cfg.get("warmup_steps", 0)), max(total_steps - 1, 0))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    else:
        raise ConfigError(f"optim.schedule={cfg.schedule!r} is unknown; use one of {SCHEDULES}.")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def update_rule(cfg, lr: optax.ScalarOrSchedule) -> list[optax.GradientTransformation]:
    """Weight decay and the optimizer (``cfg.name``) at learning rate ``lr``, without clipping."""
    if cfg.name == "sgd":
        decay = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
        return decay + [optax.sgd(lr, momentum=cfg.momentum or None,
                                  nesterov=cfg.get("nesterov", False))]
    if cfg.name == "adamw":
        return [optax.adamw(lr, weight_decay=cfg.weight_decay)]
    raise ConfigError(f"optim.name={cfg.name!r} is unknown; use one of {OPTIMIZERS}.")


def clipping(cfg) -> list[optax.GradientTransformation]:
    return [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.get("grad_clip") else []


def trainable_transform(cfg, total_steps: int) -> optax.GradientTransformation:
    """The update rule applied to trainable parameters only."""
    return optax.chain(*clipping(cfg), *update_rule(cfg, learning_rate(cfg, total_steps)))


def make_optimizer(cfg, plan: FreezePlan, params, total_steps: int) -> optax.GradientTransformation:
    tx = optax.partition({TRAINABLE: trainable_transform(cfg, total_steps),
                          FROZEN: optax.set_to_zero()}, plan.label_tree(params))
    return with_multipliers(tx, cfg, plan.blocks, params)


def with_multipliers(tx: optax.GradientTransformation, cfg, blocks: Sequence[str],
                     params) -> optax.GradientTransformation:
    """``tx`` followed by the learning-rate multipliers of ``cfg`` where any differs from 1."""
    mults = multipliers(cfg, blocks, list(tree.flatten(params)))
    if all(m == 1.0 for m in mults.values()):
        return tx
    return optax.chain(tx, scale_by_path(mults))


def multipliers(cfg, blocks: Sequence[str], paths: Sequence[str]) -> dict[str, float]:
    """Each parameter path's learning-rate multiplier: the first of ``cfg.lr_mults`` (pairs of a
    regex matched in full and a multiplier > 0, as big_vision's ``config.lr_mults``) that
    matches it, else 1; times ``cfg.layer_decay`` to the power of its block's distance from the
    last block, the head (timm's ``--layer-decay``; 0 or 1: off)."""
    mults = dict.fromkeys(paths, 1.0)
    claimed: set[str] = set()
    for pattern, mult in _lr_mult_pairs(cfg.get("lr_mults", ())):
        matched = paths_matching(paths, pattern, "optim.lr_mults regex")
        for path in set(matched) - claimed:
            mults[path] = mult
        claimed |= set(matched)
    decay = float(cfg.get("layer_decay", 0.0) or 0.0)
    if not 0.0 <= decay <= 1.0:
        raise ConfigError(f"optim.layer_decay={decay} must be in (0, 1], e.g. 0.75 as timm's "
                          "--layer-decay; 0 or 1 turns it off.")
    if decay and decay != 1.0:
        distance = {block: len(blocks) - 1 - i for i, block in enumerate(blocks)}
        mults = {p: m * decay ** distance[p.split("/", 1)[0]] for p, m in mults.items()}
    return mults


def _lr_mult_pairs(pairs) -> list[tuple[str, float]]:
    checked = []
    for pair in pairs:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str)
                or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float))):
            raise ConfigError(f"optim.lr_mults entry {pair!r} is not a (regex, multiplier) pair: "
                              "write optim.lr_mults=(('stage1/.*',0.1),).")
        if pair[1] <= 0:
            raise ConfigError(
                f"optim.lr_mults gives {pair[0]!r} the multiplier {pair[1]}: a multiplier must "
                f"be > 0; to freeze those parameters (no gradient, no optimizer state) use "
                f"freeze.regex=({pair[0]!r},).")
        checked.append((pair[0], float(pair[1])))
    return checked




def scale_by_path(mults: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies the update of each parameter path by ``mults[path]``."""
    def scale(updates, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda keys, u: u * mults["/".join(str(k.key) for k in keys)], updates)
    return optax.stateless(scale)


def holding(tx: optax.GradientTransformation, labels: frozenset) -> optax.GradientTransformation:
    """``tx``, an ``optax.partition``, with the state of the partitions ``labels`` left as it is
    (their parameters are frozen for now and will train later from that state)."""
    def update(updates, state, params=None):
        updates, new = tx.update(updates, state, params)
        inner = {k: state.inner_states[k] if k in labels else v
                 for k, v in new.inner_states.items()}
        return updates, new._replace(inner_states=inner)
    return optax.GradientTransformation(tx.init, update)
