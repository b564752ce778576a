"""Fine-tuning techniques as config fields: learning-rate multipliers by regex, layer-wise decay,
the BatchNorm policy of trainable blocks, gradual unfreezing and LP-FT (research.phases)."""

import dataclasses

import jax
import ml_collections
import numpy as np
import optax
import pytest

from research import data, phases, sharding, train, tree
from research.errors import ConfigError
from tests.research.test_claims_freeze import DIGITS, MIDDLE_BN, middle_bn_in_training

LENET = ("model.name='lenet5',data.name='digits',data.mean=(32.0,),data.std=(48.0,),"
         "data.per_class=32,train.batch_size=64")  # 320 examples: 5 steps an epoch
BLOCKS = ("c1", "c3", "c5", "f6", "head")
PLAIN_SGD = "optim.momentum=0.0,optim.weight_decay=0.0,optim.schedule='constant',optim.lr=0.1"


def batches(exp, start=0):
    for images, labels in data.train_batches(exp.train_split, exp.cfg.train.batch_size, seed=0,
                                             start_step=start):
        yield sharding.global_batch(exp.mesh, images, labels)


def first_step_updates(make_config, overrides):
    exp = train.build(make_config("fashion_mnist.py", f"{LENET},{PLAIN_SGD},{overrides}"))
    start = jax.device_get(tree.flatten(exp.state.params))
    state, _ = train.make_train_step(exp)(exp.state, *next(batches(exp)))
    return {p: np.asarray(v) - start[p] for p, v in tree.flatten(state.params).items()}


def rounding(make_config) -> dict:
    """Per path, the float32 rounding an update read back as new minus old parameters has."""
    exp = train.build(make_config("fashion_mnist.py", LENET))
    return {p: 2 * np.finfo(np.float32).eps * float(np.abs(v).max())
            for p, v in tree.flatten(jax.device_get(exp.state.params)).items()}


@pytest.fixture(scope="module")
def plain_updates(tfds_dir):
    """The first step's updates without multipliers."""
    from research import config
    make = lambda name, overrides: config.load(
        f"configs/{name}:data.tfds_dir={tfds_dir},train.progress=False,{overrides}")
    return first_step_updates(make, "optim.lr_mults=()")


@pytest.mark.parametrize("overrides, expected", [
    # First match wins: c1 takes 0.1, the other c* blocks 0.5, the rest 1.
    ("optim.lr_mults=(('c1/.*',0.1),('c.*',0.5))",
     dict(c1=0.1, c3=0.5, c5=0.5, f6=1.0, head=1.0)),
    # timm's layer decay: the head at lr, each block below × 0.5 more.
    ("optim.layer_decay=0.5", dict(c1=0.0625, c3=0.125, c5=0.25, f6=0.5, head=1.0)),
    ("optim.layer_decay=0.5,optim.lr_mults=(('head/bias',3.0),)",
     dict(c1=0.0625, c3=0.125, c5=0.25, f6=0.5, head=None))])
def test_each_parameter_moves_by_its_multiplier(make_config, plain_updates, overrides, expected):
    updates, atol = first_step_updates(make_config, overrides), rounding(make_config)
    for path, update in updates.items():
        block = path.split("/", 1)[0]
        scale = expected[block] or (3.0 if path == "head/bias" else 1.0)
        assert np.abs(plain_updates[path]).max() > 0, path
        np.testing.assert_allclose(update, scale * plain_updates[path], rtol=1e-5,
                                   atol=atol[path], err_msg=path)


@pytest.mark.parametrize("field, match", [
    ("optim.lr_mults=(('c1/.*',0.0),)", r"multiplier must be > 0.*freeze.regex=\('c1/\.\*',\)"),
    ("optim.lr_mults=(('conv9/.*',0.5),)", "matches no parameter path"),
    ("optim.lr_mults=('c1/.*',)", "not a \\(regex, multiplier\\) pair"),
    ("optim.layer_decay=1.5", r"optim.layer_decay=1.5 must be in \(0, 1\]"),
    ("freeze.bn_policy='running'", "freeze.bn_policy='running' is unknown"),
    ("freeze.unfreeze_every_epochs=1.0,freeze.cache_prefix=True,freeze.depth=1",
     "freeze.cache_prefix cannot train in phases"),
    ("freeze.probe_epochs=0.01", "under one step"),
    ("freeze.probe_lr=0.01", "freeze.probe_lr=0.01 needs freeze.probe_epochs")])
def test_bad_technique_fields_stop_before_writing(make_config, tmp_path, field, match):
    cfg = make_config("fashion_mnist.py", f"{LENET},{field}")
    with pytest.raises(ConfigError, match=match):
        train.train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_frozen_bn_policy_normalises_trainable_blocks_with_running_statistics(make_config):
    """Keras's policy: a trainable BatchNorm normalises with its running statistics, leaves them
    unchanged, and its scale still trains."""
    exp = train.build(make_config("fashion_mnist.py", f"{DIGITS},freeze.bn_policy='frozen'"))
    assert not exp.plan.frozen_paths
    start_params = jax.device_get(tree.flatten(exp.state.params))
    shape = start_params[f"{MIDDLE_BN}/scale"].shape
    rng = np.random.default_rng(0)
    mean, var = (rng.uniform(2.0, 4.0, shape) for _ in range(2))  # far from any batch's
    x, out, eps = middle_bn_in_training(exp, mean, var)
    scale, bias = start_params[f"{MIDDLE_BN}/scale"], start_params[f"{MIDDLE_BN}/bias"]
    expected = np.maximum((x - mean) / np.sqrt(var + eps) * scale + bias, 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    start_stats = jax.device_get(tree.flatten(exp.state.batch_stats))
    state, _ = train.make_train_step(exp)(exp.state, *next(batches(exp)))
    for path, value in tree.flatten(state.batch_stats).items():
        np.testing.assert_array_equal(value, start_stats[path], err_msg=path)
    scales = [p for p in start_params if p.endswith("bn1/scale")]
    assert scales and all(not np.array_equal(tree.flatten(state.params)[p], start_params[p])
                          for p in scales)


def spec(**fields):
    freeze_fields = dict(depth=0, regex=(), cache_prefix=False, unfreeze_every_epochs=0.0,
                         probe_epochs=0.0, probe_lr=0.0)
    freeze_fields.update(fields)
    return ml_collections.ConfigDict(dict(freeze=freeze_fields, optim=dict(lr=0.1)))


def test_phase_schedules():
    starts = lambda ps: [(p.start, p.depth, p.fresh) for p in ps]
    # Gradual unfreezing: the head alone, then one more block every 2 epochs, to depth 1.
    assert starts(phases.schedule(spec(depth=1, unfreeze_every_epochs=2.0), 5, 10, 100)) == [
        (0, 4, False), (20, 3, False), (40, 2, False), (60, 1, False)]
    # LP-FT: a probe, then fresh fine-tuning to depth 0; the probe's own learning rate.
    lp_ft = phases.schedule(spec(probe_epochs=3.0, probe_lr=0.01), 5, 10, 100)
    assert starts(lp_ft) == [(0, 4, False), (30, 0, True)]
    assert [(p.lr, p.origin, p.length) for p in lp_ft] == [(0.01, 0, 30), (0.1, 30, 70)]
    # Phases that would start after the run are left out.
    assert len(phases.schedule(spec(unfreeze_every_epochs=4.0), 5, 10, 100)) == 3


def partition(opt_state):
    is_partition = lambda x: isinstance(x, optax.transforms.PartitionState)
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=is_partition) if is_partition(s))


def trace(opt_state, label) -> dict:
    is_trace = lambda x: isinstance(x, optax.TraceState)
    state = partition(opt_state).inner_states[label]
    found = next(s for s in jax.tree.leaves(state, is_leaf=is_trace) if is_trace(s))
    return {p: np.asarray(v) for p, v in tree.flatten(found.trace).items()
            if isinstance(v, jax.Array)}


def counts(opt_state, label) -> set:
    return {int(x) for x in jax.tree.leaves(partition(opt_state).inner_states[label])
            if x.ndim == 0}


def test_gradual_unfreezing(make_config):
    """The head alone trains first, then one more block every epoch: a block moves only from
    its phase on, its optimizer state stays as initialised until then (its step count then
    counts its own steps), the head's momentum carries over a phase change, each frozen set
    compiles once, and each phase's frozen prefix has no backward pass (flops grow)."""
    exp = train.build(make_config("fashion_mnist.py", f"{LENET},train.epochs=5.0,"
                                  "freeze.unfreeze_every_epochs=1.0,optim.weight_decay=0.0"))
    steps = phases.train_steps(exp, train.make_train_step)
    start = jax.device_get(tree.flatten(exp.state.params))
    initial = jax.device_get(partition(exp.state.opt_state).inner_states)
    state, source = exp.state, batches(exp)
    for step in range(exp.total_steps):
        if step == 5:  # the first change of phase: c5's block joins the head
            kept = state
            zeroed_head = _with_label_state(state, "phase0", jax.device_put(
                initial["phase0"], sharding.replicated(exp.mesh)))
            without = steps.step_function(1)(jax.tree.map(lambda a: a.copy(), zeroed_head),
                                              *next(batches(exp, 5)))[0]
        state, _ = steps(step, state, *next(source))
        if step == 5:
            moved = {p: v - trace(without.opt_state, "phase0")[p]
                     for p, v in trace(state.opt_state, "phase0").items()}
            for p, v in trace(kept.opt_state, "phase0").items():
                assert np.abs(v).max() > 0, p
                np.testing.assert_allclose(moved[p], 0.9 * v, rtol=1e-4, atol=1e-7)
        if step % 5 == 4:  # the end of phase k = step // 5: the last k + 1 blocks have moved
            k = step // 5
            inner = jax.device_get(partition(state.opt_state).inner_states)
            for path, value in tree.flatten(state.params).items():
                moved = not np.array_equal(np.asarray(value), start[path])
                assert moved == (BLOCKS.index(path.split("/", 1)[0]) >= 4 - k), (step, path)
            for later in range(k + 1, 5):
                for a, b in zip(jax.tree.leaves(inner[f"phase{later}"]),
                                jax.tree.leaves(initial[f"phase{later}"]), strict=True):
                    np.testing.assert_array_equal(a, b)
            assert counts(state.opt_state, f"phase{k}") == {5}
    assert [counts(state.opt_state, f"phase{k}") for k in range(5)] == [{25}, {20}, {15}, {10}, {5}]
    assert [f._cache_size() for f in steps.compiled.values()] == [1] * 5
    phased = steps.phased
    flops = [train.compiled_flops(dataclasses.replace(exp, plan=plan, tx=tx))
             for plan, tx in zip(phased.plans, phased.optimizers)]
    assert all(a < b for a, b in zip(flops, flops[1:])), flops


def _with_label_state(state, label, label_state):
    def swap(s):
        if isinstance(s, optax.transforms.PartitionState):
            return s._replace(inner_states={**s.inner_states, label: label_state})
        return s
    is_partition = lambda x: isinstance(x, optax.transforms.PartitionState)
    return state.replace(opt_state=jax.tree.map(swap, state.opt_state, is_leaf=is_partition))


def test_lp_ft_probes_at_its_rate_then_fine_tunes_from_fresh_state(make_config, plain_updates):
    """LP-FT: the probe trains the head alone at freeze.probe_lr; fine-tuning starts at the
    switch with fresh optimizer state (not the probe's momentum) and the run's learning rate."""
    cfg = make_config("fashion_mnist.py", f"{LENET},train.epochs=2.0,freeze.probe_epochs=1.0,"
                      "freeze.probe_lr=0.01,optim.lr=0.1,optim.weight_decay=0.0,"
                      "optim.schedule='constant'")
    exp = train.build(cfg)
    steps = phases.train_steps(exp, train.make_train_step)
    start, atol = jax.device_get(tree.flatten(exp.state.params)), rounding(make_config)
    state, source = exp.state, batches(exp)
    state, _ = steps(0, state, *next(source))
    for path, value in tree.flatten(state.params).items():  # momentum's first step: lr × grad
        expected = 0.1 * plain_updates[path] if path.startswith("head/") else 0.0
        np.testing.assert_allclose(np.asarray(value) - start[path], expected, rtol=1e-5,
                                   atol=atol[path], err_msg=path)
    for step in range(1, 5):
        state, _ = steps(step, state, *next(source))
    assert np.abs(trace(state.opt_state, "phase0")["head/kernel"]).max() > 0
    copy = lambda s: jax.tree.map(lambda a: a.copy(), s)
    fresh = state.replace(opt_state=exp.tx.init(state.params))
    images, labels = next(batches(exp, 5))
    expected, _ = steps.step_function(1)(copy(fresh), images, labels)
    kept, _ = steps.step_function(1)(copy(state), images, labels)
    got, _ = steps(5, state, images, labels)
    for a, b, c in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params),
                       jax.tree.leaves(kept.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(tree.flatten(got.params)["head/kernel"],
                              tree.flatten(kept.params)["head/kernel"])


def test_phased_run_resumes_bit_identical(make_config, tmp_path):
    """LP-FT followed by gradual unfreezing, stopped at the switch to fine-tuning and in the
    middle of a later phase, ends as the uninterrupted run does."""
    cfg = make_config("fashion_mnist.py", f"{LENET},train.epochs=3.0,freeze.probe_epochs=1.0,"
                      "freeze.unfreeze_every_epochs=1.0,freeze.probe_lr=0.02")
    whole = train.train_and_evaluate(cfg, tmp_path / "whole")["state"]
    for stop in (5, 12, None):
        resumed = train.train_and_evaluate(cfg, tmp_path / "resumed", stop_after=stop)["state"]
    assert int(resumed.step) == int(whole.step) == 15
    whole, resumed = jax.device_get(whole), jax.device_get(resumed)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
