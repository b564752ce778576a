"""Training and evaluation: a jit-compiled step over a device mesh, with orbax checkpoints.

The batch is sharded over the mesh's devices and the state replicated, or sharded over its
``fsdp`` axis (``research.sharding``). A run resumes from the latest checkpoint in its workdir;
the batch at step k depends only on the seed and k, so a resumed run ends bit-identical to an
uninterrupted one, with the same metrics.jsonl (its records also written as TensorBoard event
files). With ``freeze.cache_prefix`` it trains on the frozen prefix's cached output
(``research.prefix_cache``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorboardX
from tqdm.auto import tqdm

import models
from models import cpu
from research import (checkpoints, data, freeze, guard, phases, prefix_cache, preprocess,
                      pretrained, sharding, tree)
from research.errors import ConfigError

# Parameters, optimizer state, BatchNorm statistics and the loss stay float32 in either.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so that checkpoints hold plain arrays

    def train_state(self) -> dict:
        return {"step": self.step, "opt_state": self.opt_state, "rng": self.rng}

    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, validated before anything is written."""

    cfg: Any
    model: Any
    model_meta: dict
    train_split: data.Split
    test_split: data.Split
    preprocess_spec: dict
    plan: freeze.FreezePlan
    tx: optax.GradientTransformation
    state: TrainState
    steps_per_epoch: int
    total_steps: int
    mesh: jax.sharding.Mesh

    @property
    def dtype(self) -> jnp.dtype:
        """The computation dtype (``train.dtype``); parameters stay float32."""
        return DTYPES[self.cfg.train.dtype]

    @property
    def trainable_params(self) -> int:
        return self.plan.trainable_count(self.state.params)

    def meta(self) -> dict:
        return dict(model=self.model_meta, preprocess=self.preprocess_spec,
                    config=self.cfg.to_dict(), num_classes=self.train_split.num_classes,
                    class_names=list(self.train_split.class_names))


def build(cfg) -> Experiment:
    """Validate ``cfg`` and build the model, data, freeze plan, optimizer and initial state."""
    guard.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    global_batch = cfg.train.batch_size
    _check_precision_and_accumulation(cfg.train, mesh)
    train_split, test_split = data.load_splits(cfg.data, seed=cfg.train.seed)
    model, variables, model_meta, spec = _model_and_variables(cfg, train_split)
    train_split, test_split = data.fit_pipeline(cfg, spec, train_split, test_split)
    plan = freeze.resolve(cfg.freeze, model, variables["params"])
    steps_per_epoch = len(train_split) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={global_batch} exceeds the {len(train_split)} "
                          "training examples: lower it.")
    total_steps = int(cfg.train.epochs * steps_per_epoch)
    if total_steps == 0:
        raise ConfigError(f"train.epochs={cfg.train.epochs} of {steps_per_epoch} steps makes no "
                          "step: raise train.epochs.")
    tx = phases.optimizer(cfg, model, plan, variables["params"], steps_per_epoch, total_steps)
    rng = jax.random.key_data(jax.random.key(cfg.train.seed + 1))
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"],
                       variables.get("batch_stats", {}), tx.init(variables["params"]), rng)
    state = jax.device_put(state, sharding.state_shardings(mesh, state))
    return Experiment(cfg, model, model_meta, train_split, test_split, spec, plan, tx, state,
                      steps_per_epoch, total_steps, mesh)


def _check_precision_and_accumulation(train_cfg, mesh) -> None:
    """One line for a ``train.dtype`` we do not compute in, or a ``train.batch_size`` that
    ``train.accum_steps`` micro-batches over the mesh's devices do not divide."""
    if train_cfg.dtype == "float16":
        raise ConfigError("train.dtype='float16' needs loss scaling, which transferlab does not "
                          "do: use train.dtype='bfloat16' (float32's range, no scaling).")
    if train_cfg.dtype not in DTYPES:
        raise ConfigError(f"train.dtype={train_cfg.dtype!r}; use one of {sorted(DTYPES)}.")
    accum = train_cfg.get("accum_steps", 1)
    if accum < 1 or train_cfg.batch_size % (accum * mesh.size):
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} must be a multiple of "
                          f"train.accum_steps={accum} × the {mesh.size} devices of the mesh.")


def _model_and_variables(cfg, train_split):
    """The model with a head for this task, its initial variables, meta and preprocessing."""
    source = pretrained.load(cfg.init.checkpoint) if cfg.init.checkpoint else None
    name = cfg.model.name or (source and source.meta["model"]["name"])
    if not name:
        raise ConfigError("set model.name (see models.list_models()) or init.checkpoint.")
    options = dict(cfg.model.get("options", {}))
    if source and not cfg.model.name:
        options = {**source.meta["model"].get("options", {}), **options}
    in_chans = train_split.image_shape[-1]
    model = models.create(name, num_classes=train_split.num_classes, in_chans=in_chans,
                          dtype=DTYPES[cfg.train.dtype], **options)
    spec = _preprocess_spec(cfg.data, source)
    size = spec["input_size"] or train_split.image_shape[0]
    fresh = models.init_variables(model, jax.random.key(cfg.train.seed), size)
    variables = fresh
    if source:
        variables, kept = pretrained.merge(fresh, source.variables, cfg.init.dont_load,
                                           source=str(cfg.init.checkpoint),
                                           first_block=model.blocks[0])
        if cfg.init.zero_head:
            variables = _zero(variables, kept)
    return model, variables, pretrained.model_meta(name, model, options), spec


def _preprocess_spec(data_cfg, source) -> dict:
    """The config's normalisation if it sets one, else the checkpoint's, else [-1, 1]."""
    if data_cfg.mean is not None or source is None:
        return preprocess.make_spec(data_cfg.mean or (127.5,), data_cfg.std or (127.5,),
                                    data_cfg.image_size)
    spec = dict(source.meta["preprocess"])
    if data_cfg.image_size:
        spec["input_size"] = data_cfg.image_size
    return spec


def _zero(variables: dict, paths) -> dict:
    flat = tree.flatten(variables)
    return tree.unflatten({p: jnp.zeros_like(v) if p in set(paths) else v for p, v in flat.items()})


def loss_and_metrics(logits, labels, label_smoothing: float = 0.0):
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    return losses, first_argmax(logits) == labels


def first_argmax(logits):
    """``jnp.argmax(logits, -1)`` (the first of equal maxima; a row with a NaN gives its
    length, which no label equals) as a max and a min: XLA:CPU's argmax, one reduction of
    value and index pairs, takes 3× as long."""
    classes = jnp.arange(logits.shape[-1])
    is_max = logits == logits.max(-1, keepdims=True)
    return jnp.where(is_max, classes, logits.shape[-1]).min(-1)


def make_train_step(exp: Experiment, cache: prefix_cache.PrefixCache | None = None) -> Callable:
    """``(state, images, labels) → (state, metrics)``, jit-compiled over the mesh; with a
    ``cache``, ``images`` are the frozen prefix's outputs.

    Only trainable parameters are differentiated; the optimizer sees zeros (constants, never
    computed) for frozen ones, and frozen parameters are passed through untouched. With
    ``train.accum_steps`` = k > 1 the batch is k micro-batches (``accumulate``).
    """
    model, plan, tx, spec, cfg, dtype = (exp.model, exp.plan, exp.tx, exp.preprocess_spec,
                                         exp.cfg, exp.dtype)

    def loss_fn(trainable, frozen, batch_stats, images, labels, rng):
        params = tree.unflatten({**trainable, **frozen})
        inputs = (preprocess.apply(images, spec, dtype) if cache is None
                  else cache.model_input(images.shape[0]))
        with freeze.frozen_behaviour(plan, None if cache is None else images):
            logits, updated = model.apply(
                {"params": params, "batch_stats": batch_stats}, inputs, train=True,
                rngs={"dropout": rng}, mutable=["batch_stats"])
        logits, *aux = logits if isinstance(logits, tuple) else (logits,)
        losses, correct = loss_and_metrics(logits, labels, cfg.train.label_smoothing)
        loss = losses.mean() + sum(cfg.train.aux_loss_weight *
                                   loss_and_metrics(a, labels, cfg.train.label_smoothing)[0].mean()
                                   for a in aux)
        return loss, (updated.get("batch_stats", {}), correct.mean())

    def step(state: TrainState, images, labels):
        trainable, frozen = plan.split(state.params)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = accumulate(jax.value_and_grad(loss_fn, has_aux=True),
                             cfg.train.get("accum_steps", 1))
        (loss, (batch_stats, accuracy)), grads = grad_fn(trainable, frozen, state.batch_stats,
                                                         images, labels, rng)
        zeros = jax.tree.map(jnp.zeros_like, frozen)
        updates, opt_state = tx.update(tree.unflatten({**grads, **zeros}), state.opt_state,
                                       state.params)
        updates = tree.flatten(updates)
        new_trainable = {p: v + updates[p].astype(v.dtype) for p, v in trainable.items()}
        new_state = state.replace(step=state.step + 1,
                                  params=tree.unflatten({**new_trainable, **frozen}),
                                  batch_stats=batch_stats, opt_state=opt_state)
        return new_state, {"loss": loss, "accuracy": accuracy}

    shards, batch = sharding.state_shardings(exp.mesh, exp.state), sharding.rows(exp.mesh)
    return jax.jit(step, in_shardings=(shards, batch, batch),
                   out_shardings=(shards, sharding.replicated(exp.mesh)), donate_argnums=0)


def accumulate(grad_fn: Callable, k: int) -> Callable:
    """``grad_fn`` — ``(trainable, frozen, batch_stats, images, labels, rng) → ((loss,
    (batch_stats, accuracy)), grads)`` — run on k micro-batches of the batch one after another
    (``lax.scan``): the micro-batches' mean loss, accuracy and gradient, which for equal
    micro-batches is the whole batch's (up to float rounding) where examples are independent.
    BatchNorm normalises each micro-batch by its own statistics and updates its running
    statistics once per micro-batch, in turn (as k forward passes would). Micro-batch j holds
    rows j, j + k, j + 2k, …, so each device keeps its own rows. k = 1: ``grad_fn`` itself."""
    if k == 1:
        return grad_fn

    def micro_batches(x):
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    def accumulated(trainable, frozen, batch_stats, images, labels, rng):
        def one(carry, xs):
            batch_stats, total = carry
            index, images, labels = xs
            (loss, (batch_stats, accuracy)), grads = grad_fn(
                trainable, frozen, batch_stats, images, labels, jax.random.fold_in(rng, index))
            return (batch_stats, jax.tree.map(jnp.add, total, (loss, accuracy, grads))), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, trainable))
        xs = (jnp.arange(k), micro_batches(images), micro_batches(labels))
        (batch_stats, total), _ = jax.lax.scan(one, (batch_stats, zeros), xs)
        loss, accuracy, grads = jax.tree.map(lambda t: t / k, total)
        return (loss, (batch_stats, accuracy)), grads
    return accumulated


def make_eval_step(exp: Experiment) -> Callable:
    model, spec, dtype = exp.model, exp.preprocess_spec, exp.dtype

    def step(variables, images, labels, mask):
        logits = model.apply(variables, preprocess.apply(images, spec, dtype), train=False)
        losses, correct = loss_and_metrics(logits, labels)
        return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
                "count": jnp.sum(mask)}

    shards = sharding.state_shardings(exp.mesh, exp.state.variables())
    batch = sharding.rows(exp.mesh)
    return jax.jit(step, in_shardings=(shards, batch, batch, batch),
                   out_shardings=sharding.replicated(exp.mesh))


def evaluate(exp: Experiment, state: TrainState, eval_step=None) -> dict:
    eval_step = eval_step or make_eval_step(exp)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for images, labels, mask in data.eval_batches(exp.test_split, exp.cfg.train.eval_batch_size):
        rows = data.process_rows((images, labels, mask.astype(np.float32)), jax.process_index(),
                                 jax.process_count())
        out = eval_step(state.variables(), *sharding.global_batch(exp.mesh, *rows))
        totals = {k: totals[k] + float(out[k]) for k in totals}
    return {"loss": totals["loss_sum"] / totals["count"],
            "accuracy": totals["correct"] / totals["count"]}


def compiled_flops(exp: Experiment, cache: prefix_cache.PrefixCache | None = None,
                   inputs: jax.ShapeDtypeStruct | None = None) -> float:
    """XLA's flop count of one compiled train step (``cost_analysis()``), traced with XLA's own
    convolutions and products, since it counts none in native kernels. With a ``cache``,
    ``inputs`` describes a batch of the frozen prefix's outputs."""
    b = exp.cfg.train.batch_size
    batch = sharding.rows(exp.mesh)
    if inputs is None:
        inputs = jax.ShapeDtypeStruct((b, *exp.train_split.image_shape), jnp.uint8)
    inputs = jax.ShapeDtypeStruct(inputs.shape, inputs.dtype, sharding=batch)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch)
    with cpu.xla_lowering_only():
        compiled = make_train_step(exp, cache).lower(exp.state, inputs, labels).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def train_and_evaluate(cfg, workdir: str | Path, *, stop_after: int | None = None) -> dict:
    """Train ``cfg`` in ``workdir`` (resuming from its latest checkpoint) and evaluate.

    ``stop_after`` ends the run after that many steps in total, as an interruption would.
    Under ``guard.handle_stop_signals`` SIGTERM or SIGINT saves the current step and raises
    ``Interrupted``; a loss or parameter that is not finite raises ``TrainingDiverged`` and is
    never saved; the workdir and values are checked (``guard``) before anything is written.
    Returns the final metrics, the trainable parameter count, the seconds spent and those spent
    compiling (``compile_seconds``: tracing, lowering and XLA's compilation, or the persistent
    compilation cache's retrieval, of every program the run compiled).
    """
    start, compiling_before = time.perf_counter(), _compile_clock()[0]
    guard.check_workdir(workdir, cfg)
    exp = build(cfg)
    workdir = Path(workdir)
    state = _resume(exp, workdir)
    cache = _prefix_cache(exp, state) if cfg.freeze.get("cache_prefix") else None
    workdir.mkdir(parents=True, exist_ok=True)
    mngr = checkpoints.manager(workdir / checkpoints.SUBDIR, max_to_keep=cfg.train.keep_checkpoints)
    train_step, eval_step = phases.train_steps(exp, make_train_step, cache), make_eval_step(exp)
    end = exp.total_steps if stop_after is None else min(stop_after, exp.total_steps)
    step = int(state.step)
    batches = data.train_batches(cache.split if cache else exp.train_split,
                                 cfg.train.batch_size // jax.process_count(),
                                 cfg.train.seed, start_step=step,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    bar = tqdm(total=exp.total_steps, initial=step, desc=cfg.get("name", "train"),
               disable=not cfg.train.progress or jax.process_index() != 0, leave=False)
    epoch_metrics, history = _resume_records(exp, workdir / "metrics.jsonl", step), []
    watch = guard.LossWatch(cfg)
    while step < end:
        images, labels = next(batches)
        state, metrics = train_step(step, state, *sharding.global_batch(exp.mesh, images, labels))
        step += 1
        watch.after_step(step, metrics)
        if guard.stop_signal():
            end = step  # save this step, then stop
        epoch_metrics.append(metrics)
        bar.update(1)
        if step == end or _every(step, exp.steps_per_epoch * cfg.train.eval_every_epochs):
            history.append(_epoch_record(exp, state, step, epoch_metrics, eval_step))
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}",
                            test=f"{history[-1]['test_accuracy']:.3f}")
            _append_jsonl(workdir / "metrics.jsonl", history[-1])
            epoch_metrics = []
        if step == end or _every(step, exp.steps_per_epoch * cfg.train.checkpoint_every_epochs):
            guard.check_finite_variables(state.variables(), step, cfg)
            checkpoints.save(mngr, step, state.variables(), exp.meta(), state.train_state())
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    guard.raise_if_stopped(step, workdir)
    final = history[-1] if history else _epoch_record(exp, state, step, [], eval_step)
    return dict(final, trainable_params=exp.trainable_params, n_train=len(exp.train_split),
                seconds=time.perf_counter() - start, compile_seconds=_compile_clock()[0] - compiling_before,
                state=state)


@functools.cache
def _compile_clock() -> list[float]:
    """A one-element list holding the seconds this process has spent compiling so far (JAX's
    ``/jax/core/compile/`` events: tracing, lowering, and XLA's compilation or the persistent
    cache's retrieval), counted from the first call on."""
    seconds = [0.0]

    def count(event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            seconds[0] += duration

    jax.monitoring.register_event_duration_secs_listener(count)
    return seconds


def _prefix_cache(exp: Experiment, state: TrainState) -> prefix_cache.PrefixCache:
    """The frozen prefix's output for every training example (``freeze.cache_prefix``), once
    a step on it from ``state`` is checked to equal a step through the whole network."""
    cache = prefix_cache.empty(exp)
    _check_cached_step(exp, state, cache)
    return prefix_cache.fill(cache, exp, state.variables(), exp.cfg.train.eval_batch_size)


def _check_cached_step(exp: Experiment, state: TrainState, cache: prefix_cache.PrefixCache):
    """One step from the prefix's cached output and one through the whole network, from
    ``state`` on the same examples (a batch the mesh divides), must give the same loss and the
    same updated parameters (a fresh head of zeros can hide a difference in the loss alone)."""
    positions = (np.arange(max(2, exp.mesh.size) * exp.cfg.train.get("accum_steps", 1))
                 % len(exp.train_split))
    local = data.process_rows(exp.train_split.read_batch(positions), jax.process_index(),
                              jax.process_count())
    images, labels = sharding.global_batch(exp.mesh, *local)
    copy = lambda: jax.tree.map(lambda a: a.copy(), state)
    whole, expected = make_train_step(exp)(copy(), images, labels)
    cached, got = make_train_step(exp, cache)(copy(), cache.prefix(state.variables(), images),
                                              labels)
    expected, got = float(expected["loss"]), float(got["loss"])
    same_update = all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(
        jax.tree.leaves(whole.params), jax.tree.leaves(cached.params), strict=True))
    if not (np.isclose(got, expected, rtol=1e-4, atol=1e-5) and same_update):
        raise ConfigError(
            f"freeze.cache_prefix: a step on cached outputs of block "
            f"{exp.plan.frozen_prefix[-1]!r} gives loss {got:.6g} and "
            f"{'the same' if same_update else 'other'} parameters, the whole network loss "
            f"{expected:.6g}. {type(exp.model).__name__}'s later blocks read more than that "
            "block's output, or its frozen blocks are random in training (dropout): train "
            "without freeze.cache_prefix, or at another freeze.depth.")


def _every(step: int, period: float) -> bool:
    return period > 0 and step % max(int(round(period)), 1) == 0


def _resume(exp: Experiment, workdir: Path) -> TrainState:
    """The state of ``workdir``'s latest checkpoint, or the initial state where it has none;
    writes nothing."""
    if checkpoints.latest_step(workdir / checkpoints.SUBDIR) is None:
        return exp.state
    variables, _, train_state = checkpoints.restore(workdir, set_aside_damaged=True,
                                                    with_train_state_like=exp.state.train_state(),
                                                    variables_like=exp.state.variables())
    return exp.state.replace(params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), **train_state)


def _resume_records(exp: Experiment, path: Path, step: int) -> list[dict]:
    """For a run resuming at ``step``: the train metrics of its period's steps run before a
    stop, one a step, for the period's record to average them all; ``path`` is left with the
    records before them, as an uninterrupted run writes (a stop's mid-period record, and any
    written after the checkpoint the run resumes from, removed)."""
    if step == exp.total_steps or not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    kept = [r for r in records if r["step"] <= step]
    stopped = []
    if kept and kept[-1]["step"] == step and not _every(
            step, exp.steps_per_epoch * exp.cfg.train.eval_every_epochs):
        last = kept.pop()
        steps = step - (kept[-1]["step"] if kept else 0)
        stopped = [{"loss": last["train_loss"], "accuracy": last["train_accuracy"]}] * steps
    if jax.process_index() == 0 and kept != records:
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return stopped


def _epoch_record(exp, state, step, epoch_metrics, eval_step) -> dict:
    test = evaluate(exp, state, eval_step)
    train = {k: float(np.mean([float(m[k]) for m in epoch_metrics])) if epoch_metrics else
             float("nan") for k in ("loss", "accuracy")}
    return {"step": step, "epoch": step / exp.steps_per_epoch, "train_loss": train["loss"],
            "train_accuracy": train["accuracy"], "test_loss": test["loss"],
            "test_accuracy": test["accuracy"]}


def _append_jsonl(path: Path, record: dict) -> None:
    """The record appended to ``path`` and, as TensorBoard scalars, to an event file beside it
    (tensorboardX, no TensorFlow needed); process 0 only."""
    if jax.process_index() == 0:
        with open(path, "a") as f:
            f.write(json.dumps(guard.json_safe(record), allow_nan=False) + "\n")
        with tensorboardX.SummaryWriter(str(path.parent),
                                        filename_suffix=f".step{record['step']}") as writer:
            for key, value in record.items():
                writer.add_scalar(key, value, record["step"])
