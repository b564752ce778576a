"""research.freeze's claims: frozen BatchNorm normalises with its running statistics wherever it
sits; depth and regexes freeze as a union, each regex matched against whole paths; a cached
prefix is refused where a frozen block is random in training (dropout)."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

import models
from research import convert, freeze, preprocess, pretrained, train, tree
from research.errors import ConfigError

DIGITS = "data.name='digits',data.mean=(32.0,),data.std=(48.0,),train.batch_size=64"
MIDDLE_BN = "stage2/block0/bn1"  # followed by a ReLU (fused)


def record_calls(path: str, calls: list):
    """An interceptor recording ``(input, output)`` of the module at ``path``, as the model
    sees them: placed outside ``frozen_behaviour``, it records what the frozen layer returns."""
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and "/".join(context.module.path) == path:
            calls.append((args[0], out))
        return out
    return nn.intercept_methods(interceptor)


def middle_bn_in_training(exp, mean, var):
    """``(input, output, epsilon)`` of ``MIDDLE_BN`` in a train-mode pass of 16 examples under
    ``exp``'s freeze plan, its running statistics set to ``mean`` and ``var``."""
    stats = tree.flatten(jax.device_get(exp.state.batch_stats))
    stats[f"{MIDDLE_BN}/mean"], stats[f"{MIDDLE_BN}/var"] = mean, var
    variables = {"params": jax.device_get(exp.state.params), "batch_stats": tree.unflatten(stats)}
    images, _ = exp.train_split.read_batch(np.arange(16))
    inputs = train.preprocess.apply(images, exp.preprocess_spec, exp.dtype)
    calls = []
    with record_calls(MIDDLE_BN, calls), freeze.frozen_behaviour(exp.plan):
        exp.model.apply(variables, inputs, train=True, mutable=["batch_stats"])
    (x, out), = calls
    return np.asarray(x), np.asarray(out), batch_norm_epsilon(exp.model, variables, inputs,
                                                              MIDDLE_BN)


def test_frozen_batchnorm_in_the_middle_normalises_with_its_running_statistics(make_config):
    exp = train.build(make_config("fashion_mnist.py",
                                  f"{DIGITS},freeze.regex=('{MIDDLE_BN}/.*',)"))
    assert exp.plan.frozen_prefix == () and MIDDLE_BN in exp.plan.frozen_modules
    channels = tree.flatten(exp.state.params)[f"{MIDDLE_BN}/scale"].shape[0]
    rng = np.random.default_rng(0)
    mean = rng.uniform(2.0, 4.0, channels).astype(np.float32)  # far from any batch's mean
    var = rng.uniform(4.0, 9.0, channels).astype(np.float32)
    x, out, eps = middle_bn_in_training(exp, mean, var)
    flat = tree.flatten(jax.device_get(exp.state.params))
    scale, bias = flat[f"{MIDDLE_BN}/scale"], flat[f"{MIDDLE_BN}/bias"]
    relu = lambda y: np.maximum(y, 0)
    expected = relu((x - mean) / np.sqrt(var + eps) * scale + bias)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with_batch_statistics = relu((x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + eps)
                                 * scale + bias)
    assert not np.allclose(out, with_batch_statistics, atol=1e-2)


def batch_norm_epsilon(model, variables, inputs, path: str) -> float:
    """The epsilon of the BatchNorm layer at ``path``."""
    found = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and "/".join(context.module.path) == path:
            assert isinstance(context.module, nn.BatchNorm)
            found.append(context.module.epsilon)
        return next_fun(*args, **kwargs)
    with nn.intercept_methods(interceptor):
        model.apply(variables, inputs, train=False)
    return found[0]


def resnet_small_params():
    model = models.create("resnet_small", num_classes=10, in_chans=1)
    return model, models.init_variables(model, jax.random.key(0), 28)["params"]


def spec(**kwargs):
    return ml_collections.ConfigDict(dict(dict(depth=0, regex=()), **kwargs))


def test_depth_and_regex_freeze_their_union():
    model, params = resnet_small_params()
    paths = list(tree.flatten(params))
    plan = freeze.resolve(spec(depth=1, regex=("stage2/.*", "head/bias")), model, params)
    expected = {p for p in paths if p.startswith(("stem/", "stage2/"))} | {"head/bias"}
    assert set(plan.frozen_paths) == expected
    assert plan.frozen_prefix == ("stem",)  # stage1 trains: the prefix stops there


def test_regex_matches_whole_paths_only():
    model, params = resnet_small_params()
    # "stage2" alone is a prefix of every stage2 path (re.match would freeze them all).
    plan = freeze.resolve(spec(regex=("stage2|stage2/block0/conv1/kernel",)), model, params)
    assert plan.frozen_paths == ["stage2/block0/conv1/kernel"]
    for prefix_only in ("stage2", "stage2/block0/conv1", "stem/conv1/kern"):
        with pytest.raises(ConfigError, match="must match a whole path"):
            freeze.resolve(spec(regex=(prefix_only,)), model, params)


def small_vit_checkpoint(directory):
    """A two-block, narrow ViT for digits (10 classes, one channel, 32 px) with a random head:
    a fresh ViT head is zeros, whose loss no feature moves."""
    options = dict(depth=2, width=32, num_heads=2)
    model = models.create("vit_ti16", num_classes=10, in_chans=1, **options)
    variables = models.init_variables(model, jax.random.key(0), 32)
    flat = tree.flatten(variables)
    flat["params/head/kernel"] = jax.random.normal(jax.random.key(1),
                                                   flat["params/head/kernel"].shape)
    meta = dict(model=pretrained.model_meta("vit_ti16", model, options),
                preprocess=preprocess.make_spec((32.0,), (48.0,), 32))
    return convert.write(directory, tree.unflatten(flat), meta)


def cached_vit_run(checkpoint, rate: float) -> str:
    return (f"data.name='digits',data.per_class=4,train.batch_size=8,train.epochs=1.0,"
            f"init.checkpoint='{checkpoint}',init.dont_load=(),model.name='',data.mean=None,"
            f"data.std=None,model.options={{'encoder_dropout':{rate}}},freeze.depth=2,"
            "freeze.cache_prefix=True")


def test_cached_prefix_is_refused_for_a_frozen_block_with_dropout_alone(make_config, tmp_path):
    """A ViT whose frozen prefix (embed, block00) is the only input of the later blocks: with
    dropout off the cached step is accepted, with dropout on it is refused."""
    checkpoint = small_vit_checkpoint(tmp_path / "vit")
    train.train_and_evaluate(make_config("fashion_mnist.py", cached_vit_run(checkpoint, 0.0)),
                             tmp_path / "without", stop_after=1)
    with pytest.raises(ConfigError, match=r"random in training \(dropout\)"):
        train.train_and_evaluate(make_config("fashion_mnist.py", cached_vit_run(checkpoint, 0.3)),
                                 tmp_path / "with", stop_after=1)
