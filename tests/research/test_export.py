"""Every registered architecture's train and eval steps lower for GPUs and TPUs with no CPU-only
call in them: the CPU kernels of models.cpu (XLA FFI targets registered for the CPU) stay on
the CPU, and no host callback is in a step. Lowering compiles nothing: the variables are zeros
of their shapes, the images synthetic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

import models
from models.cpu import native
from research import export, prefix_cache, train

# One architecture per family (module of models/) runs by default; CI runs the rest (slow)
# but the deeper and wider copies of an architecture it runs, which bring no layer of their
# own and would take CI over its budget (exhaustive: `make test-all`).
ONE_PER_FAMILY = ("alexnet", "efficientnet_b0", "googlenet", "lenet5",
                  "mobilenet_v3_small", "resnet18", "vgg11_bn", "vit_ti16", "xception")
DEEPER_COPIES = (*(f"efficientnet_b{i}" for i in range(2, 8)), "resnet101", "resnet152",
                 "vit_l16", "vit_l32")
CPU_TARGETS = {f"transferlab_onednn_{name}" for name in native.TARGETS} | {"transferlab_mkl_sgemm"}
# Inception v3's auxiliary head, which trains by default, needs 299² inputs.
TRAIN_SIZE = {"inception_v3": 299}
# Two experiments cover both dtypes and the three freeze regimes: float32 with nothing frozen
# (its train and eval steps), bfloat16 with two blocks frozen (its train step, and the train
# step on the cached prefix).
EXPERIMENTS = {"float32": "train.dtype='float32'",
               "bfloat16, 2 blocks frozen": "train.dtype='bfloat16',freeze.depth=2"}


def family(name: str) -> str:
    factory = models.model_info(name).factory
    return getattr(factory, "func", factory).__module__


@pytest.fixture
def zero_init(monkeypatch):
    """Variables as zeros of their shapes (the same in every dtype the model computes in):
    lowering reads shapes only, and the initialiser's compilation would cost more than the
    export."""
    shapes = {}

    def zeros(model, rng, image_size):
        key = (repr(model.clone(dtype=jnp.float32)), image_size)
        if key not in shapes:
            shapes[key] = models.variable_shapes(model, image_size)
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes[key])
    monkeypatch.setattr(models, "init_variables", zeros)


def tiny_experiment(make_config, name: str, overrides: str) -> train.Experiment:
    """``name`` on synthetic 8×8 images resized to its smallest training size (at least 32²),
    batches of 2, one device."""
    size = TRAIN_SIZE.get(name, max(32, models.model_info(name).min_size))
    return train.build(make_config("fashion_mnist.py", (
        f"model.name={name},data.name='synthetic:8x8x3:10',data.image_size={size},"
        "data.mean=None,data.std=None,data.per_class=1,train.batch_size=2,"
        f"train.eval_batch_size=2,mesh.data=1,{overrides}")))


def test_one_per_family_covers_every_family():
    assert {family(n) for n in ONE_PER_FAMILY} == {family(n) for n in models.list_models()}


def sweep_param(name: str):
    if name in ONE_PER_FAMILY:
        return name
    marks = [pytest.mark.slow] + ([pytest.mark.exhaustive] if name in DEEPER_COPIES else [])
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [sweep_param(n) for n in models.list_models()])
def test_steps_lower_for_gpu_and_tpu_without_cpu_calls(make_config, zero_init, name):
    float32, frozen = (tiny_experiment(make_config, name, o) for o in EXPERIMENTS.values())
    exported = {
        "train step, float32": export.export_train_step(float32, export.ACCELERATORS),
        "eval step, float32": export.export_eval_step(float32, export.ACCELERATORS),
        "train step, bfloat16, 2 blocks frozen": export.export_train_step(
            frozen, export.ACCELERATORS),
        "train step, bfloat16, on the cached prefix": export.export_train_step(
            frozen, export.ACCELERATORS, cache=prefix_cache.empty(frozen))}
    for what, module in exported.items():
        assert module.platforms == export.ACCELERATORS, what
        assert export.cpu_only_calls(module) == set(), f"{name}, {what}"


def test_the_check_finds_the_cpu_kernels(make_config, zero_init):
    """The same step lowered for the CPU holds the native kernels, and the check names them."""
    if not native.available():
        pytest.skip(f"the native library did not build: {native.unavailable_reason()}")
    exp = tiny_experiment(make_config, "resnet_small", "")
    images = jax.ShapeDtypeStruct((2, *exp.train_split.image_shape), jnp.uint8)
    on_cpu = jax_export.export(
        train.make_train_step(exp), platforms=("cpu",),
        disabled_checks=[jax_export.DisabledSafetyCheck.custom_call(t) for t in CPU_TARGETS])(
        exp.state, images, jax.ShapeDtypeStruct((2,), jnp.int32))
    found = export.cpu_only_calls(on_cpu)
    assert found and found <= CPU_TARGETS
    assert export.custom_call_targets(on_cpu) - CPU_TARGETS == set()


def test_a_host_callback_is_never_exported():
    """A step with a host callback (CPU- or GPU-specific) cannot be exported at all, so the
    exports above hold none."""
    def with_callback(x):
        return jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    with pytest.raises(NotImplementedError, match="host_callbacks"):
        jax_export.export(jax.jit(with_callback), platforms=("cpu",))(
            jax.ShapeDtypeStruct((3,), jnp.float32))
