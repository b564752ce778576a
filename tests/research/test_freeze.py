import jax
import numpy as np
import pytest

from research import freeze, sharding, train, tree
from research.errors import ConfigError

DIGITS = "data.name='digits',data.mean=(32.0,),data.std=(48.0,),train.batch_size=64"


def run_steps(exp, n):
    step = train.make_train_step(exp)
    batches = train.data.train_batches(exp.train_split, exp.cfg.train.batch_size, seed=0)
    state = exp.state
    for _ in range(n):
        state, _ = step(state, *sharding.global_batch(exp.mesh, *next(batches)))
    return state


@pytest.mark.parametrize("spec", ["freeze.depth=2", "freeze.regex=('stage2/.*','stem/bn1/.*')"])
def test_frozen_parameters_and_statistics_stay_bit_identical(make_config, spec):
    exp = train.build(make_config("fashion_mnist.py", f"{DIGITS},{spec}"))
    start_params = jax.device_get(tree.flatten(exp.state.params))
    start_stats = jax.device_get(tree.flatten(exp.state.batch_stats))
    state = run_steps(exp, 3)
    params, stats = tree.flatten(state.params), tree.flatten(state.batch_stats)
    frozen = set(exp.plan.frozen_paths)
    frozen_modules = exp.plan.frozen_modules
    assert frozen
    for path, value in params.items():
        same = np.array_equal(np.asarray(value), start_params[path])
        assert same == (path in frozen), path
    for path, value in stats.items():
        module = path.rpartition("/")[0]
        same = np.array_equal(np.asarray(value), start_stats[path])
        assert same == (module in frozen_modules), path


def test_optimizer_keeps_no_state_for_frozen_parameters(make_config):
    exp = train.build(make_config("fashion_mnist.py", f"{DIGITS},freeze.depth=3"))
    state_size = sum(x.size for x in jax.tree.leaves(exp.state.opt_state) if x.ndim)
    assert state_size == exp.trainable_params  # one momentum buffer per trainable parameter
    assert exp.trainable_params < sum(x.size for x in jax.tree.leaves(exp.state.params))


@pytest.mark.parametrize("extra", ["", pytest.param(",model.name='lenet5',train.accum_steps=2",
                                                   marks=pytest.mark.slow)])
def test_compiled_flops_fall_as_freeze_depth_grows(make_config, extra):
    """With global-norm clipping and weight decay on: neither pulls frozen gradients back; nor
    does accumulation over micro-batches."""
    flops = [train.compiled_flops(train.build(make_config(
        "fashion_mnist.py", f"{DIGITS},freeze.depth={d},optim.grad_clip=1.0{extra}")))
        for d in range(5)]
    assert all(a > b for a, b in zip(flops, flops[1:])), flops


def test_depth_beyond_blocks_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"freeze.depth=5 .* use 0 .* to 4"):
        train.build(make_config("fashion_mnist.py", f"{DIGITS},freeze.depth=5"))


def test_regex_matching_nothing_is_refused(make_config):
    with pytest.raises(ConfigError, match="matches no parameter path"):
        train.build(make_config("fashion_mnist.py", f"{DIGITS},freeze.regex=('stage9/.*',)"))


def test_frozen_prefix_and_modules():
    labels = {"stem/conv1/kernel": freeze.FROZEN, "stem/bn1/scale": freeze.FROZEN,
              "stage1/conv/kernel": freeze.FROZEN, "stage1/bn/scale": freeze.TRAINABLE,
              "head/kernel": freeze.TRAINABLE}
    plan = freeze.FreezePlan(labels, ("stem", "stage1", "head"))
    assert plan.frozen_prefix == ("stem",)
    assert plan.frozen_modules == {"stem/conv1", "stem/bn1", "stage1/conv"}
