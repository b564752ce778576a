"""oneDNN convolutions and matrix products, and the batch norm's native sums, through XLA's FFI
against XLA's own, alone, under jit over a sharded mesh, and inside a model's train step."""

import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from models.cpu import dispatch, native
from tests.cpu.test_dispatch import (NHWC, assert_batch_norm_equals_autodiff,
                                     assert_same_values_and_gradients, grouped_conv)

needs_native = pytest.mark.skipif(
    not native.available(),
    reason=f"oneDNN is unavailable ({native.unavailable_reason()}); `make setup` installs it")


def test_missing_onednn_headers_are_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "HEADER", tmp_path / "absent" / "dnnl.hpp")
    with pytest.raises(OSError, match="libdnnl-dev"):
        native.build_library()
    assert not list(tmp_path.rglob("*.so"))


def openmp_settings_on_loading(**env) -> tuple[str, str]:
    """What OpenMP says of its settings as a fresh process loads the library, and what that
    process's environment holds of the wait policy afterwards."""
    loads = ("import os; from models.cpu import native; assert native.available(); "
             "print(os.environ.get('OMP_WAIT_POLICY'))")
    done = subprocess.run([sys.executable, "-c", loads], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parents[2],
                          env={**os.environ, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    return done.stderr, done.stdout.strip()


@needs_native
def test_openmp_loads_passive_unless_the_environment_says_otherwise(monkeypatch):
    for key in native.OPENMP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    shown, left = openmp_settings_on_loading()  # unset, GNU OpenMP would spin 300000 times
    assert "GOMP_SPINCOUNT = '0'" in shown and left == "None"
    shown, left = openmp_settings_on_loading(OMP_WAIT_POLICY="ACTIVE")
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in shown and left == "ACTIVE"


@needs_native
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the clones are x86-64's")
def test_native_loops_have_clones_with_fma_for_avx2_and_avx512_cpus():
    """GCC's "avx2" and "avx512f" targets leave out FMA; x86-64-v3 and v4 include it."""
    library = native.build_library().read_bytes()
    for loop in (b"SumChunk", b"SoftmaxRows", b"NormalizeRows", b"OutputTile"):
        for level in (b"arch_x86_64_v3", b"arch_x86_64_v4", b"default"):
            assert re.search(loop + rb"\w*\." + level + b"\0", library), (loop, level)
    assert not re.search(rb"\.avx2\0|\.avx512f\0", library)


def conv_of(op, strides, padding):
    return lambda x, w: op(x, w, strides, padding, dimension_numbers=NHWC)


@needs_native
@pytest.mark.parametrize("size,kernel,channels,stride,padding", [
    (9, 3, (5, 6), 1, ((1, 1), (1, 1))), (10, 3, (4, 5), 2, "SAME"),
    (16, 7, (3, 8), 2, ((3, 3), (3, 3))), (8, 1, (16, 32), 1, "VALID"),
    (8, 1, (16, 32), 2, "VALID"), (10, 3, (4, 5), 2, ((0, 1), (0, 1))),
    (9, 3, (4, 5), (2, 1), ((1, 1), (2, 0)))])
def test_conv_and_its_gradients_equal_xlas(size, kernel, channels, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, size, size + 1, channels[0])), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, *channels)), jnp.float32)
    strides = (stride, stride) if isinstance(stride, int) else stride
    assert_same_values_and_gradients(conv_of(dispatch.conv_general_dilated, strides, padding),
                                     conv_of(lax.conv_general_dilated, strides, padding), x, w,
                                     atol=1e-4)


@needs_native
@pytest.mark.parametrize("size,kernel,channels,groups,stride,padding", [
    (9, 3, (6, 6), 6, 1, ((1, 1), (1, 1))), (10, 5, (8, 8), 8, 2, "SAME"),
    (11, 3, (4, 8), 4, 2, ((0, 1), (0, 1))), (8, 3, (6, 9), 3, 1, "SAME"),
    (12, 5, (40, 40), 40, 1, ((2, 1), (1, 2))), (9, 7, (16, 16), 16, 2, "VALID")])
def test_grouped_conv_and_its_gradients_equal_xlas(size, kernel, channels, groups, stride,
                                                   padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, size, size, channels[0])), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, channels[0] // groups, channels[1])),
                    jnp.float32)
    conv = lambda op: grouped_conv(op, (stride, stride), padding, groups)
    assert "transferlab_onednn_forward" in compiled_text(conv(dispatch.conv_general_dilated), x, w)
    assert_same_values_and_gradients(conv(dispatch.conv_general_dilated),
                                     conv(lax.conv_general_dilated), x, w, atol=1e-4)


@needs_native
def test_3x3_stride_1_convolutions_run_winograd_with_xlas_values_and_gradients(winograd):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 14, 14, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 80)) / np.sqrt(9 * 64), jnp.float32)
    g = jnp.asarray(rng.standard_normal((4, 14, 14, 80)), jnp.float32)

    def values_and_gradients(op):
        y, pullback = jax.vjp(conv_of(op, (1, 1), "SAME"), x, w)
        return (y, *pullback(g))
    ours = jax.jit(lambda: values_and_gradients(dispatch.conv_general_dilated))()
    for got, expected in zip(ours, values_and_gradients(lax.conv_general_dilated)):
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    if native.onednn_has_winograd():
        passes = {p for p, kernel in native.implementations() if "wino" in kernel}
        assert passes == {"forward", "backward_data", "backward_weights"}
    else:  # this project's own (tests/cpu/test_winograd.py)
        assert "winograd_grad" in compiled_text(jax.grad(lambda x, w: jnp.vdot(
            conv_of(dispatch.conv_general_dilated, (1, 1), "SAME")(x, w), g), (0, 1)), x, w)


@needs_native
def test_winograd_is_asked_for_3x3_stride_1_only_and_can_be_turned_off(winograd, monkeypatch):
    x = jnp.ones((2, 8, 8, 64))

    def asked(kernel, stride):  # of oneDNN, or of this project's kernels where oneDNN has none
        text = compiled_text(
            lambda x, w: conv_of(dispatch.conv_general_dilated, (stride, stride), "SAME")(x, w),
            x, jnp.ones((kernel, kernel, 64, 64)))
        return "winograd = 1" in text or "winograd_input" in text
    assert asked(3, 1) and not asked(3, 2) and not asked(1, 1) and not asked(5, 1)
    monkeypatch.setenv("TRANSFERLAB_WINOGRAD", "0")
    assert not asked(3, 1)


@needs_native
@pytest.mark.parametrize("mkl", ["0", "1"])
def test_wide_stride_1_pointwise_convolutions_take_the_chosen_library_with_xlas_values(
        mkl, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_MKL", mkl)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 6, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 1, 128, 160)) / np.sqrt(128), jnp.float32)
    pointwise = conv_of(dispatch.conv_general_dilated, (1, 1), "VALID")
    grads = jax.grad(lambda x, w: (pointwise(x, w) ** 2).sum(), (0, 1))
    text = compiled_text(grads, x, w)
    if native.uses_mkl():
        assert text.count("transferlab_mkl_sgemm") == 3 and "onednn_forward" not in text
    else:
        assert "transferlab_onednn_forward" in text
    assert_same_values_and_gradients(pointwise, conv_of(lax.conv_general_dilated, (1, 1), "VALID"),
                                     x, w, atol=1e-4)
    images = jnp.tile(x, (8 // x.shape[0] + 1, 1, 1, 1))[:8]
    assert "all-gather" not in compiled_text(grads, split_over_devices(images), w)
    narrow, strided, padded = (compiled_text(conv_of(dispatch.conv_general_dilated, stride, pads),
                                             x, w[..., :width])
                               for width, stride, pads in [(127, (1, 1), "VALID"),
                                                           (160, (2, 2), "VALID"),
                                                           (160, (1, 1), ((1, 0), (0, 0)))])
    for text in (narrow, strided, padded):
        assert "transferlab_onednn_forward" in text and "mkl_sgemm" not in text


def split_over_devices(x):
    """``x`` with its batch axis split over a mesh of the 8 CPU devices the tests run with."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return jax.device_put(x, NamedSharding(mesh, P("data")))


def compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


@needs_native
def test_float32_convolutions_go_to_onednn_on_the_cpu_and_others_do_not():
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    conv = conv_of(dispatch.conv_general_dilated, (1, 1), "SAME")
    assert "transferlab_onednn_forward" in compiled_text(conv, x, w)
    assert "transferlab_onednn" not in compiled_text(conv, x.astype(jnp.bfloat16),
                                                     w.astype(jnp.bfloat16))
    with native.disabled():  # a new function: jit would reuse the trace of ``conv``
        assert "transferlab_onednn" not in compiled_text(lambda x, w: conv(x, w), x, w)


@needs_native
@pytest.mark.parametrize("kernel_shape,groups,kernel_gradient", [
    ((3, 3, 3, 4), 1, "transferlab_onednn_backward_weights"),
    ((5, 5, 1, 3), 3, "transferlab_onednn_depthwise_backward_weights")])
def test_each_device_convolves_its_shard_of_the_batch(kernel_shape, groups, kernel_gradient):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
    sharded = split_over_devices(x)
    loss = lambda op: lambda x, w: (grouped_conv(op, (1, 1), "SAME", groups)(x, w) ** 2).sum()
    grads = jax.grad(loss(dispatch.conv_general_dilated), (0, 1))
    text = compiled_text(grads, sharded, w)
    assert kernel_gradient in text and "all-gather" not in text
    for ours, theirs in zip(jax.jit(grads)(sharded, w),
                            jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def assert_resnet_gradients_equal_xlas() -> str:
    """A ResNet-18's parameter gradients in a train step equal XLA's convolutions' (float32
    rounding through 18 layers of BatchNorm); returns the compiled text of ours."""
    model = models.create("resnet18", num_classes=10)
    variables = models.init_variables(model, jax.random.key(0), 32)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

    def grads():
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, images, train=True,
                                    mutable=["batch_stats"])
            return jnp.mean(logits ** 2)
        return jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
    ours = grads()
    with native.disabled():
        theirs = grads()
    for a, b in zip(jax.tree.leaves(ours(variables["params"])),
                    jax.tree.leaves(theirs(variables["params"]))):
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    return ours.as_text()


@needs_native
def test_resnet_train_step_gradients_equal_xlas(winograd):
    assert "transferlab_onednn_backward_weights" in assert_resnet_gradients_equal_xlas()


def unpacked(attention):
    """``attention`` of q, k, v (batch, tokens, heads, depth) as a function of qkv and its
    bias."""
    return lambda qkv, bias: attention(*(qkv + bias).transpose(2, 0, 1, 3, 4))


def qkv_and_bias(shape, scale=1.0):
    rng = np.random.default_rng(0)
    return (jnp.asarray(scale * rng.standard_normal(shape), jnp.float32),
            jnp.asarray(scale * rng.standard_normal(shape[2:]), jnp.float32))


@needs_native
@pytest.mark.parametrize("shape,scale", [((2, 17, 3, 3, 8), 1), ((1, 197, 3, 6, 64), 1),
                                         ((1, 197, 3, 6, 64), 6)])  # logits past e^x's range
def test_attention_runs_onednns_fast_kernels_with_jaxs_values_and_gradients(shape, scale):
    qkv, bias = qkv_and_bias(shape, scale)
    assert_same_values_and_gradients(dispatch.self_attention,
                                     unpacked(jax.nn.dot_product_attention), qkv, bias,
                                     atol=1e-5 * scale ** 3,
                                     grad_atol=5e-5 * scale ** 3)  # the bias's: sums of 197
    kernels = {kernel for kind, kernel in native.implementations() if kind == "attention"}
    assert kernels and not any(kernel.startswith("ref") for kernel in kernels), kernels


@needs_native
def test_attention_is_one_call_each_way_keeping_only_the_probabilities():
    qkv, bias = jnp.ones((2, 17, 3, 3, 8)), jnp.ones((3, 3, 8))
    grad = jax.grad(lambda qkv, bias: (dispatch.self_attention(qkv, bias) ** 2).sum(), (0, 1))
    text = compiled_text(grad, qkv, bias)
    assert (text.count("transferlab_onednn_attention_forward"),
            text.count("transferlab_onednn_attention_backward")) == (1, 1)
    assert "matmul" not in text and "sgemm" not in text and " exponential(" not in text
    assert not re.search(r"f32\[3,3,8\]\S* reduce\(f32\[2,17,3,3,8\]", text)  # the bias's
    residuals = jax.vjp(native.self_attention, qkv, bias)[1]
    assert sorted(leaf.shape for leaf in jax.tree.leaves(residuals)) == [
        (2, 3, 17, 17), (2, 17, 3, 3, 8), (3, 3, 8)]


@needs_native
def test_each_device_attends_within_its_shard_of_the_batch():
    qkv, bias = qkv_and_bias((8, 5, 3, 2, 4))
    sharded = split_over_devices(qkv)
    loss = lambda attention: lambda qkv, bias: (attention(qkv, bias) ** 2).sum()
    grad = jax.grad(loss(native.self_attention), (0, 1))
    text = compiled_text(grad, sharded, bias)
    assert "transferlab_onednn_attention_backward" in text and "all-gather" not in text
    ours = jax.jit(grad)(sharded, bias)
    assert ours[0].sharding.spec[0] == "data"
    theirs = jax.grad(loss(unpacked(jax.nn.dot_product_attention)), (0, 1))(qkv, bias)
    for got, expected, atol in zip(ours, theirs, (1e-5, 1e-4)):  # the bias's: sums of 40
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=atol)


def product_target() -> str:
    return "transferlab_mkl_sgemm" if native.uses_mkl() else "transferlab_onednn_matmul"


@needs_native
def test_mkl_is_built_wherever_its_wheel_is_installed():
    assert native.has_mkl() == (native.mkl_runtime() is not None)


@pytest.mark.parametrize("vendor,wheel,choice,mkl", [
    ("GenuineIntel", True, "", True), ("AuthenticAMD", True, "", False),
    ("GenuineIntel", False, "", False), ("AuthenticAMD", True, "1", True),
    ("GenuineIntel", True, "0", False), ("GenuineIntel", False, "1", False)])
def test_dense_products_run_on_mkl_on_intels_cpus_or_as_told(vendor, wheel, choice, mkl,
                                                              monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_MKL", choice)
    monkeypatch.setattr(native, "cpu_info", lambda: {"vendor_id": vendor})
    monkeypatch.setattr(native, "has_mkl", lambda library=None: wheel)
    assert native.uses_mkl() == mkl


@needs_native
@pytest.mark.parametrize("choice", ["", "0", "1"])
def test_dense_products_compile_to_the_chosen_library(choice, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_MKL", choice)
    x, w = jnp.ones((2, 7, 3)), jnp.ones((3, 5))
    text = compiled_text(jax.grad(lambda x, w: (native.dense(x, w) ** 2).sum(), (0, 1)), x, w)
    assert text.count(product_target()) == 3


@needs_native
def test_dense_layers_run_one_native_product_per_pass():
    x, w = jnp.ones((2, 7, 3, 4)), jnp.ones((3, 4, 5))
    numbers = (((2, 3), (0, 1)), ((), ()))
    grads = jax.grad(lambda x, w: (dispatch.dot_general(x, w, numbers) ** 2).sum(), (0, 1))
    text = compiled_text(grads, x, w)
    assert text.count(product_target()) == 3 and " dot(" not in text
    kernels = {kernel for kind, kernel in native.implementations() if kind == "matmul"}
    assert not any(kernel.startswith("ref") for kernel in kernels), kernels


@needs_native
def test_each_device_multiplies_its_rows_and_the_kernel_gradient_is_summed():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    sharded = split_over_devices(x)
    grads = jax.grad(lambda x, w: (native.dense(x, w) ** 2).sum(), (0, 1))
    text = compiled_text(grads, sharded, w)
    assert product_target() in text and "all-gather" not in text
    assert "all-reduce" in text
    reference = jax.grad(lambda x, w: (jnp.einsum("brk,kn->brn", x, w) ** 2).sum(), (0, 1))
    ours = jax.jit(grads)(sharded, w)
    assert ours[0].sharding.spec[0] == "data"
    for got, expected in zip(ours, reference(x, w)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@needs_native
def test_layer_norm_is_one_native_call_each_way():
    x = jnp.ones((2, 5, 7), jnp.float32)
    grad = jax.grad(lambda x, s, b: (dispatch.layer_norm(x, s, b, 1e-6) ** 2).sum(), (0, 1, 2))
    text = compiled_text(grad, x, jnp.ones(7), jnp.zeros(7))
    assert (text.count("transferlab_onednn_layer_norm_forward"),
            text.count("transferlab_onednn_layer_norm_backward")) == (1, 1)
    assert not re.search(r"f32\[[^\]]*\] reduce\(f32\[2,5,7\]", text)


@needs_native
def test_each_device_normalizes_its_shard_of_the_batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 5, 6)), jnp.float32)
    scale, bias = jnp.linspace(0.5, 2, 6), jnp.linspace(-1, 1, 6)
    sharded = split_over_devices(x)
    loss = lambda x, scale, bias: (dispatch.layer_norm(x, scale, bias, 1e-6) ** 3).sum()
    grads = jax.grad(loss, (0, 1, 2))
    text = compiled_text(grads, sharded, scale, bias)
    assert "transferlab_onednn_layer_norm_backward" in text and "all-gather" not in text
    with native.disabled():
        expected = jax.jit(jax.grad(lambda *a: loss(*a), (0, 1, 2)))(x, scale, bias)
    for ours, theirs in zip(jax.jit(grads)(sharded, scale, bias), expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def exact_gelu_gradient(u, dy):
    """The exact GELU's gradient at u given dy, in float64."""
    u = u.astype(np.float64)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(u / math.sqrt(2.0)))
    return dy * (cdf + u * np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi))


@needs_native
def test_native_gelu_gradient_from_the_output_equals_float64s():
    x = np.linspace(-15.0, 15.0, 2 * 301 * 5, dtype=np.float32).reshape(2, 301, 5)
    x[0, 0] = [0.0, -1e-30, 1e-30, -3e38, 3e38]
    bias = np.array([0.0, 0.0, 0.0, 0.0, 0.5], np.float32)
    dy = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    y = dispatch.gelu(jnp.asarray(x + bias))
    du, sums = jax.jit(native.gelu_backward)(jnp.asarray(x), jnp.asarray(bias), y,
                                             jnp.asarray(dy))
    expected = exact_gelu_gradient(x + bias, dy)
    np.testing.assert_allclose(du, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sums, expected.sum(1), rtol=1e-5, atol=1e-5)


@needs_native
def test_bias_gelu_gradient_is_one_native_pass_and_each_device_takes_its_shard():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 5, 6)), jnp.float32)
    bias = jnp.linspace(-1.0, 1.0, 6)
    loss = lambda x, bias: (dispatch.bias_gelu(x, bias) ** 2).sum()
    grads = jax.grad(loss, (0, 1))
    text = compiled_text(grads, split_over_devices(x), bias)
    assert text.count("transferlab_onednn_gelu_backward") == 1 and "all-gather" not in text
    forward = compiled_text(lambda x, bias: dispatch.bias_gelu(x, bias).sum(), x, bias)
    assert text.count(" erf(") == forward.count(" erf(") > 0  # the gradient computes none
    ours = jax.jit(grads)(split_over_devices(x), bias)
    assert ours[0].sharding.spec[0] == "data"
    expected = jax.grad(lambda x, bias: (dispatch.gelu(x + bias) ** 2).sum(), (0, 1))(x, bias)
    for got, theirs in zip(ours, expected):
        np.testing.assert_allclose(got, theirs, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("activation", [None, *dispatch.ACTIVATIONS])
def test_batch_norm_on_native_sums_equals_autodiff(activation):
    assert_batch_norm_equals_autodiff(activation)


@needs_native
def test_batch_norm_sums_each_pair_in_one_native_pass():
    """No XLA reduction over the activations: the statistics and the gradient's two sums are
    one call each; SiLU's exponential is the forward pass's only."""
    x = jnp.ones((2, 4, 4, 3), jnp.float32)
    forward = lambda x: dispatch.batch_norm(x, jnp.ones(3), jnp.zeros(3), 1e-5, "silu")[0].sum()
    text = compiled_text(jax.grad(forward), x)
    assert (text.count("transferlab_onednn_batch_norm_sums"),
            text.count("transferlab_onednn_batch_norm_activation_grad_sums")) == (1, 1)
    assert not re.search(r"f32\[[^\]]*\] reduce\(f32\[2,4,4,3\]", text)
    exponentials = re.compile(r"= f32\[2,4,4,3\][^=]* (exponential|logistic|tanh)\(")
    forward_only = compiled_text(forward, x)
    assert len(exponentials.findall(text)) == len(exponentials.findall(forward_only)) == 1


@needs_native
@pytest.mark.parametrize("images,rows", [(1, 4099), (3, 7)])
def test_native_sums_per_image_equal_numpys(images, rows):
    """Over one image split into chunks among the threads, and over images of a few rows."""
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal((images, rows, 1, 19)).astype(np.float32) for _ in range(2))
    a, b, mean = (rng.standard_normal(19).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(native.batch_norm_sums(x),
                               np.stack([x.sum((1, 2)), (x * x).sum((1, 2))], 1),
                               rtol=1e-5, atol=1e-3)
    pre = x * a + b
    g = dy * np.where(pre > 0, 1.0, 0.0)
    sums, ours = native.batch_norm_grad_sums(x, np.maximum(pre, 0), dy, a, b, mean, "relu")
    np.testing.assert_allclose(sums, np.stack([g.sum((1, 2)), (g * (x - mean)).sum((1, 2))], 1),
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(ours, g)


@needs_native
def test_native_silu_gradient_from_the_output_equals_the_sigmoids():
    """SiLU's derivative from y = silu(pre) and pre: at 0, at either end of float's range
    and between, as σ + pre·σ·(1 − σ) in float64."""
    pre = np.concatenate([[0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 88.0, -88.0, 1e4, -1e4, 3e38,
                           -3e38], np.linspace(-30, 30, 1001)]).astype(np.float32)
    x = pre.reshape(1, -1, 1, 1)
    dy = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    y = np.asarray(jax.nn.silu(jnp.asarray(x)))
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    sums, g = native.batch_norm_grad_sums(x, y, dy, one, zero, zero, "silu")
    p = pre.astype(np.float64)
    sigmoid = np.exp(-np.logaddexp(0.0, -p))
    expected = dy * (sigmoid + p * sigmoid * (1 - sigmoid)).reshape(x.shape)
    np.testing.assert_allclose(g, expected, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(sums[0, 0], expected.sum(), rtol=1e-5)


@needs_native
def test_each_device_sums_its_shard_of_the_batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 5, 5, 3)) + 1, jnp.float32)
    scale, bias = jnp.linspace(0.5, 2, 3), jnp.linspace(-1, 1, 3)
    sharded = split_over_devices(x)
    loss = lambda x, scale: (dispatch.batch_norm(x, scale, bias, 1e-5, "relu")[0] ** 3).sum()
    grads = jax.grad(loss, (0, 1))
    text = compiled_text(grads, sharded, scale)
    assert "transferlab_onednn_batch_norm_activation_grad_sums" in text
    assert "all-gather" not in text
    with native.disabled():
        expected = jax.jit(jax.grad(lambda x, scale: loss(x, scale), (0, 1)))(x, scale)
    for ours, theirs in zip(jax.jit(grads)(sharded, scale), expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


@needs_native
def test_each_device_pools_its_shard_of_the_batch_and_its_gradient():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 9, 9, 5)), jnp.float32)
    sharded = split_over_devices(x)
    grad = jax.grad(lambda x: (dispatch.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))) ** 2).sum())
    text = compiled_text(grad, sharded)
    assert "transferlab_onednn_max_pool_forward" in text
    assert "transferlab_onednn_max_pool_backward" in text and "all-gather" not in text
    with native.disabled():
        expected = jax.jit(lambda x: grad(x))(x)
    np.testing.assert_allclose(jax.jit(grad)(sharded), expected, atol=1e-6)


def relus_computed(fn, *args) -> int:
    """How many ReLUs the compiled ``fn`` evaluates: its optimized HLO's maxima from ``relu``."""
    return sum("maximum(" in line and "jit(relu)" in line
               for line in compiled_text(fn, *args).splitlines())


@needs_native
def test_residual_sums_are_computed_once_not_again_in_each_consumer(monkeypatch):
    net = models.create("resnet18", num_classes=10)
    variables = models.init_variables(net, jax.random.key(0), 32)
    x = jnp.ones((2, 32, 32, 3))
    forward = lambda v, x: net.apply(v, x, train=False)
    relus = 1 + 2 * sum(net.stage_sizes)  # the stem's, and two in each basic block
    assert relus_computed(forward, variables, x) == relus
    monkeypatch.setattr(dispatch, "materialize", lambda x: x)  # XLA left to fuse as it likes
    # a new function: jit would reuse the trace of ``forward``
    assert relus_computed(lambda v, x: net.apply(v, x, train=False), variables, x) > relus


@needs_native
def test_materialize_is_the_identity_with_its_gradient_under_a_sharded_mesh():
    x = split_over_devices(jax.random.normal(jax.random.key(0), (8, 5, 3)))
    f = lambda x: (dispatch.materialize(jnp.sin(x)) * x).sum()
    g = lambda x: (jnp.sin(x) * x).sum()
    np.testing.assert_array_equal(jax.jit(dispatch.materialize)(x), x)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.jit(jax.grad(g))(x), rtol=1e-6)
    assert "transferlab_onednn_materialize" in compiled_text(jax.grad(f), x)
    assert jax.jit(dispatch.materialize)(x).sharding.spec == P("data")
