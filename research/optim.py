"""Optimizers partitioned by freeze label: frozen parameters get ``optax.set_to_zero()``.

Clipping, weight decay and the schedule live inside the trainable partition, so nothing in the
chain ever reads a frozen gradient (which would pull the frozen backward pass back in).
"""

from __future__ import annotations

import optax

from research.errors import ConfigError
from research.freeze import FROZEN, TRAINABLE, FreezePlan

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def learning_rate(cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then ``schedule`` (cosine or constant)."""
    warmup = min(int(cfg.get("warmup_steps", 0)), max(total_steps - 1, 0))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1))
    else:
        raise ConfigError(f"optim.schedule={cfg.schedule!r} is unknown; use one of {SCHEDULES}.")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def trainable_transform(cfg, total_steps: int) -> optax.GradientTransformation:
    """The update rule applied to trainable parameters only."""
    lr = learning_rate(cfg, total_steps)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.get("grad_clip") else []
    if cfg.name == "sgd":
        if cfg.weight_decay:
            chain.append(optax.add_decayed_weights(cfg.weight_decay))
        chain.append(optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.get("nesterov", False)))
    elif cfg.name == "adamw":
        chain.append(optax.adamw(lr, weight_decay=cfg.weight_decay))
    else:
        raise ConfigError(f"optim.name={cfg.name!r} is unknown; use one of {OPTIMIZERS}.")
    return optax.chain(*chain)


def make_optimizer(cfg, plan: FreezePlan, params, total_steps: int) -> optax.GradientTransformation:
    return optax.partition({TRAINABLE: trainable_transform(cfg, total_steps),
                            FROZEN: optax.set_to_zero()}, plan.label_tree(params))
