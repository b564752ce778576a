"""Mixed precision, gradient accumulation and sharded parameters: each trains like the plain
float32, whole-batch, replicated step within a stated tolerance; bad combinations are refused in
one line; a checkpoint written on 8 devices with sharded parameters resumes on 1 and back."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import data, sharding, train, tree
from research.errors import ConfigError
from tests.research.test_claims_multihost import TRAIN
from tests.research.test_freeze import run_steps

ROOT = Path(__file__).resolve().parents[2]
DIGITS = "data.name='digits',data.mean=(32.0,),data.std=(48.0,),train.batch_size=64"
LENET = f"{DIGITS},model.name='lenet5'"  # no BatchNorm: examples are independent


def flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(params))])


def steps(make_config, overrides: str, n: int = 2):
    """The initial and the final parameters (flat) and the final state of n steps."""
    exp = train.build(make_config("fashion_mnist.py", overrides))
    start = flat(exp.state.params)
    state = run_steps(exp, n)
    return start, flat(state.params), state


def test_bfloat16_computes_in_bfloat16_with_float32_state(make_config):
    start, expected, _ = steps(make_config, DIGITS)
    _, got, state = steps(make_config, f"{DIGITS},train.dtype='bfloat16'")
    for part in (state.params, state.opt_state, state.batch_stats):
        floats = [x.dtype for x in jax.tree.leaves(part) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and set(floats) == {jnp.dtype(jnp.float32)}
    # bfloat16's 8-bit mantissa: two steps land within a quarter of their own length of
    # float32's (0.10 measured), and not on it (then nothing ran in bfloat16).
    distance = np.linalg.norm(got - expected) / np.linalg.norm(expected - start)
    assert 0 < distance < 0.25, distance


@pytest.mark.parametrize("overrides, message", [
    ("train.dtype='float16'", "needs loss scaling"),
    ("train.accum_steps=16", r"multiple of train.accum_steps=16 × the 8 devices"),
    ("mesh.fsdp=3", r"mesh.fsdp=3 must be a positive divisor of the 8"),
])
def test_bad_precision_accumulation_or_fsdp_is_refused(make_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train.build(make_config("fashion_mnist.py", f"{DIGITS},{overrides}"))


def test_accumulated_step_equals_the_whole_batch_step(make_config):
    _, expected, _ = steps(make_config, LENET)
    _, got, _ = steps(make_config, f"{LENET},train.accum_steps=4")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_accumulation_with_batchnorm_averages_its_micro_batches_steps(make_config):
    """The stated semantics: each micro-batch normalised by its own statistics, the running
    statistics updated by each in turn. A first SGD step (momentum from zero, weight decay) is
    linear in the gradient, so the accumulated step's parameters are the mean of the
    micro-batches' own steps."""
    exp = train.build(make_config("fashion_mnist.py", f"{DIGITS},train.accum_steps=2"))
    plain = train.build(make_config("fashion_mnist.py", DIGITS))
    images, labels = exp.train_split.read_batch(np.arange(64))
    copy = lambda: jax.tree.map(lambda a: a.copy(), exp.state)
    accumulated, metrics = train.make_train_step(exp)(
        copy(), *sharding.global_batch(exp.mesh, images, labels))
    one_step = train.make_train_step(plain)
    first, first_metrics = one_step(copy(), *sharding.global_batch(exp.mesh, images[0::2],
                                                                   labels[0::2]))
    second, second_metrics = one_step(
        copy().replace(batch_stats=first.batch_stats),
        *sharding.global_batch(exp.mesh, images[1::2], labels[1::2]))
    np.testing.assert_allclose(flat(accumulated.params),
                               (flat(first.params) + flat(second.params)) / 2, atol=1e-5)
    np.testing.assert_allclose(flat(accumulated.batch_stats), flat(second.batch_stats),
                               rtol=1e-5, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(
        (float(first_metrics["loss"]) + float(second_metrics["loss"])) / 2, rel=1e-5)


@pytest.mark.slow
def test_cached_prefix_trains_with_accumulation(make_config, tmp_path):
    """The cached step (on micro-batches of the prefix's outputs) is checked against the
    whole network's before training, and refused if they differ."""
    result = train.train_and_evaluate(make_config(
        "fashion_mnist.py", f"{DIGITS},freeze.depth=2,freeze.cache_prefix=True,"
        "train.accum_steps=2"), tmp_path, stop_after=1)
    assert result["step"] == 1 and np.isfinite(result["train_loss"])


def test_fsdp_shards_parameters_and_optimizer_state_and_trains_like_replicated(make_config):
    _, expected, _ = steps(make_config, LENET)
    _, got, state = steps(make_config, f"{LENET},mesh.fsdp=4")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    kernel = tree.flatten(state.params)["c5/kernel"]  # (5, 5, 16, 120): 120 split in 4
    momentum = [x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape]
    for array in (kernel, *momentum):
        assert array.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
        assert array.addressable_shards[0].data.shape == (5, 5, 16, 30)
    assert momentum


def train_on_one_device(config: str, workdir: Path, *stop_after) -> dict:
    """The final variables (flat) of a run in a process that sees one CPU device."""
    final = workdir.parent / f"{workdir.name}.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-c", TRAIN, config, str(workdir), str(final),
                           *map(str, stop_after)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with np.load(final) as arrays:
        return dict(arrays)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_one_device_and_back(make_config, tfds_dir, tmp_path):
    run = f"{LENET},train.epochs=0.1"  # 2 steps
    sharded = make_config("fashion_mnist.py", f"{run},mesh.fsdp=8")
    data.load_splits(sharded.data, seed=0)
    one_device = (f"{ROOT}/configs/fashion_mnist.py:{run},data.tfds_dir={tfds_dir},"
                  "train.progress=False")
    expected = tree.flatten(jax.device_get(train.train_and_evaluate(sharded, tmp_path / "whole")
                                           ["state"].variables()))
    train.train_and_evaluate(sharded, tmp_path / "eight_to_one", stop_after=1)
    eight_to_one = train_on_one_device(one_device, tmp_path / "eight_to_one")
    train_on_one_device(one_device, tmp_path / "one_to_eight", 1)
    one_to_eight = train.train_and_evaluate(sharded, tmp_path / "one_to_eight")["state"]
    one_to_eight = tree.flatten(jax.device_get(one_to_eight.variables()))
    assert sorted(eight_to_one) == sorted(one_to_eight) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_allclose(eight_to_one[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(one_to_eight[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
