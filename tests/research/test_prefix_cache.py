"""Training on cached outputs of the frozen prefix equals training through the whole network,
and costs only the trainable blocks."""

import json

import jax
import numpy as np
import pytest

from models import cpu
from research import prefix_cache, sharding, train
from research.errors import ConfigError

FEW = "data.per_class=20,train.batch_size=40,train.epochs=2.0,train.checkpoint_every_epochs=0.0"


def history(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cached_prefix_run_equals_the_whole_network_run(make_config, tmp_path):
    whole = train.train_and_evaluate(make_config("fashion_mnist.py", f"{FEW},freeze.depth=2"),
                                     tmp_path / "whole")
    cached = train.train_and_evaluate(
        make_config("fashion_mnist.py", f"{FEW},freeze.depth=2,freeze.cache_prefix=True"),
        tmp_path / "cached")
    expected, got = history(tmp_path / "whole"), history(tmp_path / "cached")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [5, 10]
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-3)
    whole, cached = jax.device_get(whole["state"].params), jax.device_get(cached["state"].params)
    assert jax.tree.structure(whole) == jax.tree.structure(cached)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(cached), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_cached_step_computes_none_of_the_frozen_prefix(make_config):
    exp = train.build(make_config("fashion_mnist.py", f"{FEW},freeze.depth=2"))
    b = exp.cfg.train.batch_size
    images, labels = sharding.global_batch(  # sharded: cost_analysis counts one device's flops
        exp.mesh, np.zeros((b, *exp.train_split.image_shape), np.uint8), np.zeros((b,), np.int32))
    cache = prefix_cache.empty(exp)
    assert cache.input_shape == (28, 28, 1)
    prefix = prefix_cache.prefix_function(exp.model, exp.plan, exp.preprocess_spec, exp.dtype)

    def flops_and_convolutions(jitted, *args):  # XLA's convolutions: oneDNN's count no flops
        with cpu.xla_lowering_only():
            compiled = jitted.lower(*args).compile()
        return compiled.cost_analysis()["flops"], compiled.as_text().count(" convolution(")
    features = jax.eval_shape(prefix, exp.state.variables(), images)
    # a fresh function: a jit function keeps the trace eval_shape made
    prefix_cost = flops_and_convolutions(jax.jit(lambda v, x: prefix(v, x)),
                                         exp.state.variables(), images)
    whole = flops_and_convolutions(train.make_train_step(exp), exp.state, images, labels)
    cached = flops_and_convolutions(train.make_train_step(exp, cache), exp.state,
                                    *sharding.global_batch(exp.mesh, np.zeros(features.shape,
                                                                              features.dtype)),
                                    labels)
    assert prefix_cost[1] > 0 and cached[1] == whole[1] - prefix_cost[1]
    assert cached[0] == pytest.approx(whole[0] - prefix_cost[0], rel=0.02)


def test_cache_without_a_frozen_prefix_is_refused(make_config, tmp_path):
    with pytest.raises(ConfigError, match="freeze.depth"):
        train.train_and_evaluate(make_config("fashion_mnist.py", f"{FEW},freeze.cache_prefix=True"),
                                 tmp_path)


@pytest.mark.slow
def test_model_whose_later_blocks_read_an_earlier_frozen_block_is_refused(make_config, tmp_path):
    # GoogLeNet's first auxiliary head (frozen, its loss still counted) reads inception4a's
    # output, inside a frozen prefix ending at inception4b.
    cfg = make_config("fashion_mnist.py", "data.name='digits',model.name='googlenet',"
                      "model.options={'aux_logits':True},data.image_size=32,train.batch_size=32,"
                      "data.mean=(32.0,),data.std=(48.0,),freeze.depth=6,freeze.cache_prefix=True")
    with pytest.raises(ConfigError, match="read more than"):
        train.train_and_evaluate(cfg, tmp_path)
