"""Training in phases of growing trainable sets: gradual unfreezing and LP-FT.

Gradual unfreezing (ULMFiT, Howard & Ruder 2018; ``freeze.unfreeze_every_epochs=k``): the run
starts with only the head (the last of ``model.blocks``) trainable and unfreezes one more block,
from the head down, every ``k`` epochs, down to ``freeze.depth``. LP-FT (Kumar et al. 2022;
``freeze.probe_epochs=p``): a linear probe (every block but the head frozen) for ``p`` epochs,
at ``freeze.probe_lr`` if set, then fine-tuning down to ``freeze.depth`` from the probed head.
With both set, the probe comes first and the fine-tuning that follows unfreezes gradually.

The phase is a function of the step, so a resumed run picks up the phase it stopped in and ends
bit-identical to an uninterrupted one. The optimizer state covers every parameter that trains in
any phase from the start (checkpoints hold one structure), partitioned by the phase a parameter
starts training in: a partition's state (momentum, Adam's moments and step count) stays as
initialised until its phase and is then carried on through the later phases, as PyTorch's
per-parameter state is when ``requires_grad`` turns on. The learning-rate schedule is the
run's, by step, for every partition; global-norm clipping precedes the partitions and sees a
phase's frozen gradients as zeros (constants: no backward pass computes them). LP-FT's
fine-tuning starts as the paper's separate run: fresh optimizer state and its own schedule over
the remaining steps. Each phase's train step is
``research.train``'s with that phase's freeze plan (its frozen prefix has no backward pass),
compiled once per distinct frozen set. A cached prefix (``freeze.cache_prefix``) is refused: the
prefix changes between phases.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import optax

from research import freeze, optim, sharding, tree
from research.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Phase:
    start: int  # its first step
    depth: int  # freeze.depth during the phase
    lr: float  # the peak of its learning-rate schedule
    origin: int  # the step its schedule (and, if fresh, its optimizer state) starts at
    length: int  # the steps its schedule spans
    fresh: bool  # the optimizer state is initialised anew at ``start``


def enabled(cfg) -> bool:
    return bool(cfg.freeze.get("unfreeze_every_epochs") or cfg.freeze.get("probe_epochs"))


def schedule(cfg, num_blocks: int, steps_per_epoch: int, total_steps: int) -> list[Phase]:
    """The phases of a run with ``cfg``, in order, each starting before ``total_steps``."""
    every, probe = cfg.freeze.get("unfreeze_every_epochs", 0.0), cfg.freeze.get("probe_epochs", 0.0)
    probe_lr = cfg.freeze.get("probe_lr", 0.0)
    if every < 0 or probe < 0 or probe_lr < 0:
        raise ConfigError("freeze.unfreeze_every_epochs, freeze.probe_epochs and "
                          "freeze.probe_lr must be ≥ 0 (0: off).")
    if cfg.freeze.get("cache_prefix"):
        raise ConfigError("freeze.cache_prefix cannot train in phases (freeze.unfreeze_every_epochs"
                          ", freeze.probe_epochs): the frozen prefix changes between them. Set "
                          "freeze.cache_prefix=False, or train without phases.")
    head_only, target = num_blocks - 1, cfg.freeze.depth
    probe_steps = round(probe * steps_per_epoch)
    if (probe and not probe_steps) or (every and round(every * steps_per_epoch) < 1):
        raise ConfigError(f"freeze.probe_epochs={probe} or freeze.unfreeze_every_epochs={every} "
                          f"is under one step of the {steps_per_epoch} an epoch has: raise it.")
    phases = []
    if probe_steps:
        phases.append(Phase(0, head_only, probe_lr or cfg.optim.lr, 0, probe_steps, False))
    origin, length = probe_steps, total_steps - probe_steps
    first = head_only - 1 if probe_steps else head_only
    depths = (list(range(first, target - 1, -1)) if every else []) or [target]
    for i, depth in enumerate(depths):
        start = probe_steps + round(i * every * steps_per_epoch)
        fresh = bool(probe_steps) and i == 0
        phases.append(Phase(start, depth, cfg.optim.lr, origin, length, fresh))
    return [p for p in phases if p.start < total_steps]


def phase_at(phases: list[Phase], step: int) -> int:
    return max(i for i, p in enumerate(phases) if p.start <= step)


def optimizer(cfg, model, plan: freeze.FreezePlan, params, steps_per_epoch: int,
              total_steps: int) -> optax.GradientTransformation:
    """The run's optimizer: a phased run's last phase's (whose state every phase shares),
    else ``optim.make_optimizer``'s."""
    if cfg.freeze.get("probe_lr") and not cfg.freeze.get("probe_epochs"):
        raise ConfigError(f"freeze.probe_lr={cfg.freeze.probe_lr} needs freeze.probe_epochs (the "
                          "linear probe's length) > 0: set it, or leave freeze.probe_lr at 0.")
    if not enabled(cfg):
        return optim.make_optimizer(cfg.optim, plan, params, total_steps)
    return build(cfg, model, params, steps_per_epoch, total_steps).optimizers[-1]


def train_steps(exp, make_train_step: Callable, cache=None) -> Callable:
    """``(step, state, images, labels) → (state, metrics)`` for ``exp``'s run: its one train
    step, or in a phased run the step of ``step``'s phase (``TrainSteps``)."""
    if not enabled(exp.cfg):
        train_step = make_train_step(exp, cache)
        return lambda step, state, images, labels: train_step(state, images, labels)
    phased = build(exp.cfg, exp.model, exp.state.params, exp.steps_per_epoch, exp.total_steps)
    return TrainSteps(exp, phased, make_train_step, cache)


@dataclasses.dataclass
class Phased:
    """A phased run's freeze plans and optimizers, one per phase; ``labels`` partitions the
    parameters by the phase they start training in (or ``freeze.FROZEN``)."""

    phases: list[Phase]
    plans: list[freeze.FreezePlan]
    labels: dict[str, str]
    optimizers: list[optax.GradientTransformation]


def build(cfg, model, params, steps_per_epoch: int, total_steps: int) -> Phased:
    phases = schedule(cfg, len(model.blocks), steps_per_epoch, total_steps)
    plans = [freeze.resolve(dict(cfg.freeze, depth=p.depth), model, params) for p in phases]
    labels = {}
    for i, plan in enumerate(plans):
        for path, label in plan.labels.items():
            if label == freeze.TRAINABLE:
                labels.setdefault(path, f"phase{i}")
    labels = {p: labels.get(p, freeze.FROZEN) for p in plans[0].labels}
    txs = [_optimizer(cfg.optim, phases, i, labels, model.blocks, params)
           for i in range(len(phases))]
    return Phased(phases, plans, labels, txs)


def _optimizer(cfg, phases: list[Phase], index: int, labels: dict[str, str], blocks,
               params) -> optax.GradientTransformation:
    """Phase ``index``'s optimizer: every partition's update rule at that phase's schedule, the
    state of partitions whose phase has not come yet held; the same state structure for every
    phase."""
    phase = phases[index]
    transforms = {freeze.FROZEN: optax.set_to_zero()}
    held = set()
    for i, starting in enumerate(phases):
        label = f"phase{i}"
        if label not in labels.values():
            continue
        if i > index:
            held.add(label)
        offset = max(starting.start, phase.origin) - phase.origin
        lr = _shifted(optim.learning_rate(cfg, phase.length, phase.lr), offset)
        transforms[label] = optax.chain(*optim.update_rule(cfg, lr))
    partitioned = optax.partition(transforms, tree.unflatten(labels))
    tx = optax.chain(*optim.clipping(cfg), optim.holding(partitioned, frozenset(held)))
    return optim.with_multipliers(tx, cfg, blocks, params)


def _shifted(schedule: optax.Schedule, offset: int) -> optax.Schedule:
    """The schedule of a partition whose step count starts ``offset`` steps into it."""
    return lambda count: schedule(count + offset)


class TrainSteps:
    """``(step, state, images, labels) → (state, metrics)``: the train step of ``step``'s
    phase, compiled once per distinct frozen set; at the start of a fresh phase the optimizer
    state is initialised anew first."""

    def __init__(self, exp, phased: Phased, make_train_step: Callable, cache=None):
        self.exp, self.phased, self.cache = exp, phased, cache
        self.make_train_step = make_train_step
        self.compiled: dict[tuple, Callable] = {}

    def step_function(self, index: int) -> Callable:
        plan = self.phased.plans[index]
        phase = self.phased.phases[index]
        key = (tuple(plan.frozen_paths), phase.lr, phase.origin, phase.length)
        if key not in self.compiled:
            exp = dataclasses.replace(self.exp, plan=plan, tx=self.phased.optimizers[index])
            self.compiled[key] = self.make_train_step(exp, self.cache)
        return self.compiled[key]

    def __call__(self, step: int, state, images, labels):
        index = phase_at(self.phased.phases, step)
        phase = self.phased.phases[index]
        if phase.fresh and step == phase.start:
            fresh = self.phased.optimizers[index].init(state.params)
            state = state.replace(
                opt_state=jax.device_put(fresh, sharding.state_shardings(self.exp.mesh, fresh)))
        return self.step_function(index)(state, images, labels)
