"""The CPU formulations of convolutions (those oneDNN does not take), products, attention and
max pooling against XLA's own ops, and the batch norm with a hand-written gradient against
autodiff and Flax's."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models import layers
from models.cpu import dispatch, native

NHWC = ("NHWC", "HWIO", "NHWC")


def grouped_conv(conv, strides, padding, channels):
    return lambda x, w: conv(x, w, strides, padding, dimension_numbers=NHWC,
                             feature_group_count=channels)


def assert_same_values_and_gradients(ours, theirs, *args, atol=2e-5, grad_atol=None):
    rng = np.random.default_rng(1)
    expected, pullback = jax.vjp(theirs, *args)
    g = jax.tree.map(lambda e: jnp.asarray(rng.standard_normal(e.shape), jnp.float32), expected)
    got, grads = jax.jit(lambda g, *a: (ours(*a), jax.vjp(ours, *a)[1](g)))(g, *args)
    for values, bound in (((got, expected), atol), ((grads, pullback(g)), grad_atol or atol)):
        for ours_value, their_value in zip(*map(jax.tree.leaves, values), strict=True):
            np.testing.assert_allclose(ours_value, their_value, atol=bound)


@pytest.mark.parametrize("size,channels,kernel,stride,padding", [
    (9, 5, 3, 1, "SAME"), (10, 4, 3, 2, "SAME"), (11, 6, 5, 2, ((2, 2), (2, 2))),
    (8, 3, 5, 1, ((1, 3), (0, 2))), (7, 8, 3, 2, "VALID")])
def test_depthwise_conv_and_its_gradients_equal_xlas(size, channels, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, channels)), jnp.float32)
    with native.disabled():
        assert_same_values_and_gradients(
            grouped_conv(dispatch.conv_general_dilated, (stride, stride), padding, channels),
            grouped_conv(lax.conv_general_dilated, (stride, stride), padding, channels), x, w,
            atol=1e-5, grad_atol=2e-5)


def test_depthwise_conv_on_the_cpu_is_no_grouped_convolution():
    x, w = jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 1, 4))
    conv = grouped_conv(dispatch.conv_general_dilated, (1, 1), "SAME", 4)
    with native.disabled():
        hlo = jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), (0, 1))).lower(x, w).as_text(
            dialect="hlo")
    assert jax.default_backend() == "cpu" and "feature_group_count" not in hlo


def test_other_convolutions_without_onednn_are_xlas():
    x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))  # grouped, not depthwise
    conv = grouped_conv(dispatch.conv_general_dilated, (1, 1), "SAME", 2)
    with native.disabled():
        np.testing.assert_array_equal(conv(x, w), grouped_conv(lax.conv_general_dilated,
                                                               (1, 1), "SAME", 2)(x, w))


@pytest.mark.parametrize("kernel,groups,stride,padding,expected", [
    (3, 4, 1, "SAME", "depthwise_taps"), (1, 1, 2, "VALID", "pointwise"),
    (3, 1, 2, "SAME", "strided"), (3, 1, 1, "SAME", "xla"), (3, 2, 2, "SAME", "xla")])
def test_convolutions_without_the_native_library_take_xlas_better_forms(kernel, groups, stride,
                                                                        padding, expected):
    x, w = jnp.zeros((2, 8, 8, 4)), jnp.zeros((kernel, kernel, 4 // groups, 4))
    with native.disabled():
        assert dispatch.conv_kernel(x, w, (stride, stride), padding, dimension_numbers=NHWC,
                                    feature_group_count=groups) == expected
        nchw = ("NCHW", "OIHW", "NCHW")
        assert dispatch.conv_kernel(x, w, (stride, stride), padding, dimension_numbers=nchw,
                                    feature_group_count=groups) == "xla"


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_and_its_gradients_equal_xlas(stride):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 7, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 1, 6, 5)), jnp.float32)
    conv = lambda op: lambda x, w: op(x, w, (stride, stride), "VALID", dimension_numbers=NHWC)
    with native.disabled():
        assert_same_values_and_gradients(conv(dispatch.conv_general_dilated),
                                         conv(lax.conv_general_dilated), x, w)


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (9, 3, 2, ((1, 1), (1, 1))), (10, 3, 2, "SAME"), (11, 7, 2, ((3, 3), (3, 3))),
    (10, 5, 3, ((2, 1), (0, 2))), (8, 2, 2, "VALID"), (9, 3, (2, 1), ((1, 1), (1, 1)))])
def test_strided_conv_and_its_gradients_equal_xlas(size, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, size, size + 1, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 4, 5)), jnp.float32)
    strides = (stride, stride) if isinstance(stride, int) else stride
    conv = lambda op: lambda x, w: op(x, w, strides, padding, dimension_numbers=NHWC)
    with native.disabled():
        assert_same_values_and_gradients(conv(dispatch.conv_general_dilated),
                                         conv(lax.conv_general_dilated), x, w, atol=1e-4)


@pytest.fixture(params=["native", "xla"])
def kernels(request):
    """This project's native kernels (``models.cpu.native``: oneDNN's products, max pooling's
    gradient), or XLA's formulations."""
    if request.param == "xla":
        with native.disabled():
            yield request.param
    elif not native.available():
        pytest.skip(f"the native library is unavailable ({native.unavailable_reason()})")
    else:
        yield request.param


UNROLLED = [  # (input size, window, stride, padding): every output sees every input
    ((1, 1), 3, 1, ((1, 1), (1, 1))), ((2, 2), 3, 1, ((1, 1), (1, 1))),
    ((2, 2), 3, 2, ((1, 1), (1, 1))), ((1, 2), 3, 1, ((1, 1), (1, 1))),
    ((5, 5), 5, 1, ((0, 0), (0, 0)))]


@pytest.mark.parametrize("size,window,stride,padding", UNROLLED)
def test_convolutions_over_maps_no_larger_than_the_window_are_one_product(
        size, window, stride, padding, kernels):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, *size, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((window, window, 6, 5)), jnp.float32)
    strides = (stride, stride)
    assert dispatch.conv_kernel(x, w, strides, padding, dimension_numbers=NHWC) == "unrolled"
    conv = lambda op: lambda x, w: op(x, w, strides, padding, dimension_numbers=NHWC)
    assert_same_values_and_gradients(conv(dispatch.conv_general_dilated),
                                     conv(lax.conv_general_dilated), x, w, atol=1e-4)


@pytest.mark.parametrize("size,window,stride,padding", [
    ((4, 4), 3, 1, ((1, 1), (1, 1))),   # a corner output misses the far corner
    ((2, 2), 1, 2, ((0, 0), (0, 0))),   # a strided 1×1 skips inputs
    ((224, 224), 3, 1, ((1, 1), (1, 1)))])  # decided without a (H·W)² table
def test_convolutions_with_unjoined_positions_are_not_unrolled(size, window, stride, padding):
    x, w = jnp.zeros((2, *size, 4)), jnp.zeros((window, window, 4, 4))
    assert dispatch.conv_kernel(x, w, (stride, stride), padding,
                                dimension_numbers=NHWC) != "unrolled"


@pytest.mark.parametrize("lhs_shape,rhs_shape,contract", [
    ((4, 9, 6), (6, 5), ((2,), (0,))),              # Dense on tokens
    ((4, 9, 6), (6, 3, 2), ((2,), (0,))),           # query/key/value projections to heads
    ((4, 9, 3, 2), (3, 2, 5), ((2, 3), (0, 1))),    # heads back to features
    ((9, 6), (6, 5), ((1,), (0,))),                 # a matrix product already
    ((6, 4, 9), (6, 5), ((0,), (0,))),              # another contraction: XLA's own
])
def test_dot_general_and_its_gradients_equal_xlas(lhs_shape, rhs_shape, contract, kernels):
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)
    numbers = (contract, ((), ()))
    assert_same_values_and_gradients(lambda a, b: dispatch.dot_general(a, b, numbers),
                                     lambda a, b: lax.dot_general(a, b, numbers), lhs, rhs,
                                     atol=1e-4)


@pytest.mark.parametrize("dot_general,copies", [(dispatch.dot_general, False),
                                                (lax.dot_general, True)])
def test_dense_kernel_gradient_on_the_cpu_copies_no_transpose(dot_general, copies):
    x, w, g = jnp.zeros((16, 197, 384)), jnp.zeros((384, 1152)), jnp.zeros((16, 197, 1152))
    numbers = (((2,), (0,)), ((), ()))
    pullback = lambda w, g: jax.vjp(lambda w: dot_general(x, w, numbers), w)[1](g)
    hlo = jax.jit(pullback).lower(w, g).compile().as_text()
    assert bool(re.search(r"= f32\S* (transpose|copy)\(", hlo)) == copies


@pytest.mark.parametrize("window,stride,padding", [
    (3, 2, ((1, 1), (1, 1))), (3, 2, "SAME"), (2, 2, "VALID"), (3, 1, ((1, 1), (1, 1))),
    (3, 2, ((0, 1), (0, 1)))])
def test_max_pool_and_its_gradient_equal_xlas_without_ties(window, stride, padding,
                                                           kernels):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 67)), jnp.float32)  # 2 blocks of channels
    pads = padding if isinstance(padding, str) else ((0, 0), *padding, (0, 0))
    theirs = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                                         (1, stride, stride, 1), pads)
    ours = lambda x: dispatch.max_pool(x, (window, window), (stride, stride), padding)
    expected, pullback = jax.vjp(theirs, x)
    g = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
    np.testing.assert_array_equal(ours(x), expected)
    np.testing.assert_allclose(jax.jit(lambda x, g: jax.vjp(ours, x)[1](g)[0])(x, g),
                               pullback(g)[0], atol=1e-6)  # overlapping windows add in turn


def test_residual_relu_and_its_gradient_are_relus_zeros_included(kernels):
    x = np.asarray([[-2.0, -0.0, 0.0, 1e-30, 3.0], [5.0, -1.0, 0.0, 2.0, -7.0]], np.float32)
    g = np.arange(1, 11, dtype=np.float32).reshape(2, 5)
    np.testing.assert_array_equal(jax.jit(dispatch.residual_relu)(x), np.maximum(x, 0))
    ours = jax.jit(lambda x, g: jax.vjp(dispatch.residual_relu, x)[1](g)[0])(x, g)
    np.testing.assert_array_equal(ours, np.where(x > 0, g, 0))  # zero at 0 and -0


def test_max_pool_passes_nans_and_pools_windows_half_in_the_padding_as_xla(kernels):
    x = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 5, 3) - 70.0
    x = x.at[0, 2, 2, 1].set(jnp.nan)
    ours = jax.jit(lambda x: dispatch.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))))(x)
    theirs = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))
    assert np.isnan(ours).sum() == 1
    np.testing.assert_array_equal(ours, theirs)


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window(kernels):
    """As PyTorch's MaxPool2d: after a ReLU, windows of zeros pass their gradient to the top
    left zero only."""
    x = jnp.zeros((1, 4, 4, 1)).at[0, 3, 3, 0].set(1.0)
    grad = jax.grad(lambda x: dispatch.max_pool(x, (2, 2), (2, 2), "VALID").sum())(x)[0, :, :, 0]
    expected = np.zeros((4, 4))
    expected[0, 0] = expected[0, 2] = expected[2, 0] = expected[3, 3] = 1.0
    np.testing.assert_array_equal(grad, expected)


def batch_norm_by_autodiff(x, scale, bias, eps, activation=None):
    mean = x.mean((0, 1, 2))
    var = (x * x).mean((0, 1, 2)) - mean * mean
    y = (x - mean) * lax.rsqrt(var + eps) * scale + bias
    act = {None: lambda y: y, "relu": jax.nn.relu, "relu6": jax.nn.relu6, "silu": jax.nn.silu,
           "hard_swish": lambda y: y * jax.nn.relu6(y + 3) / 6}[activation]
    return act(y), mean, var


def assert_batch_norm_equals_autodiff(activation, shape=(3, 4, 5, 6)):
    """Including the gradients through the returned statistics, scales and shifts that put
    values on every piece of each activation."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 2 + 1, jnp.float32)
    scale, bias = jnp.linspace(0.5, 4, shape[-1]), jnp.linspace(-3, 4, shape[-1])
    assert_same_values_and_gradients(lambda *a: dispatch.batch_norm(*a, 1e-5, activation),
                                     lambda *a: batch_norm_by_autodiff(*a, 1e-5, activation),
                                     x, scale, bias, atol=1e-4)


@pytest.mark.parametrize("activation", [None, *dispatch.ACTIVATIONS])
def test_batch_norm_and_its_gradients_equal_autodiff(activation):
    with native.disabled():  # XLA's sums (test_native checks the native ones)
        assert_batch_norm_equals_autodiff(activation)


class FlaxBatchNormThen(nn.Module):
    act: layers.Activation | None
    use_running_average: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.BatchNorm(self.use_running_average, momentum=0.9, epsilon=1e-3, name="bn")(x)
        return y if self.act is None else self.act(y)


@pytest.mark.parametrize("act", [None, nn.relu, jax.nn.relu6, nn.silu, layers.hard_swish,
                                 jnp.tanh])
def test_fused_batch_norm_trains_and_evaluates_as_flaxs_then_its_activation(act):
    """Same variables, outputs, running statistics and gradients as ``nn.BatchNorm`` followed
    by ``act``, whether ``dispatch.batch_norm`` fuses it (all but tanh) or not."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 5, 5, 6)) * 3 + 1, jnp.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ours = layers.FusedBatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3, act=act)
    theirs = FlaxBatchNormThen(act)
    nested = lambda tree: {collection: {"bn": v} for collection, v in tree.items()}
    variables = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, nested(variables)) == jax.tree.map(
        jnp.shape, theirs.init(jax.random.key(0), x))
    params = {"scale": jnp.linspace(0.5, 2, 6), "bias": jnp.linspace(-1, 1, 6)}

    def train(module, nest):
        def loss(params, x):
            y, updates = module.apply(nest({"params": params,
                                            "batch_stats": variables["batch_stats"]}),
                                      x, mutable=["batch_stats"])
            return (y * g).sum() + (y * y).sum(), updates
        return jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)

    (ours_loss, ours_stats), ours_grads = train(ours, lambda tree: tree)
    (their_loss, their_stats), their_grads = train(theirs, nested)
    for a, b in zip(jax.tree.leaves((ours_loss, nested(ours_stats), ours_grads)),
                    jax.tree.leaves((their_loss, their_stats, their_grads))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    running = {"params": params, "batch_stats": ours_stats["batch_stats"]}
    np.testing.assert_allclose(
        layers.FusedBatchNorm(use_running_average=True, epsilon=1e-3, act=act).apply(running, x),
        FlaxBatchNormThen(act, use_running_average=True).apply(nested(running), x),
        rtol=1e-6, atol=1e-6)


def test_gelu_and_its_gradient_equal_jaxs_exact_gelu():
    x = jnp.linspace(-12.0, 12.0, 2001, dtype=jnp.float32)
    assert_same_values_and_gradients(dispatch.gelu, lambda x: jax.nn.gelu(x, approximate=False), x,
                                     atol=2e-6)


def test_gelu_keeps_only_its_input_for_the_gradient():
    residuals = jax.vjp(dispatch.gelu, jnp.ones(5))[1]
    assert [leaf.shape for leaf in jax.tree.leaves(residuals)] == [(5,)]


def test_add_to_each_image_and_its_gradients_equal_broadcastings():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 7, 5)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((1, 7, 5)), jnp.float32)
    assert_same_values_and_gradients(dispatch.add_to_each_image, jnp.add, x, y)


@pytest.mark.parametrize("shape", [(4, 9, 24), (3, 5, 2, 7)])
def test_layer_norm_equals_flaxs_with_its_variables_and_gradients(shape, kernels):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    variables = nn.LayerNorm(epsilon=1e-6).init(jax.random.key(0), x)
    variables = jax.tree.map(lambda v: v + jnp.asarray(rng.standard_normal(v.shape), v.dtype),
                             variables)
    assert (jax.tree.structure(layers.LayerNorm(epsilon=1e-6).init(jax.random.key(0), x))
            == jax.tree.structure(variables))
    assert_same_values_and_gradients(
        lambda v, x: layers.LayerNorm(epsilon=1e-6).apply(v, x),
        lambda v, x: nn.LayerNorm(epsilon=1e-6).apply(v, x), variables, x, atol=1e-4)


def test_self_attention_and_its_gradients_equal_jaxs():
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.standard_normal((2, 7, 3, 3, 4)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((3, 3, 4)), jnp.float32)
    with native.disabled():  # XLA's products (test_native checks oneDNN's)
        assert_same_values_and_gradients(
            dispatch.self_attention,
            lambda qkv, bias: jax.nn.dot_product_attention(*(qkv + bias).transpose(2, 0, 1, 3, 4)),
            qkv, bias)
