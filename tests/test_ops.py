"""The CPU formulations of depthwise convolution and max pooling against XLA's own ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models import ops

NHWC = ("NHWC", "HWIO", "NHWC")


def grouped_conv(conv, strides, padding, channels):
    return lambda x, w: conv(x, w, strides, padding, dimension_numbers=NHWC,
                             feature_group_count=channels)


@pytest.mark.parametrize("size,channels,kernel,stride,padding", [
    (9, 5, 3, 1, "SAME"), (10, 4, 3, 2, "SAME"), (11, 6, 5, 2, ((2, 2), (2, 2))),
    (8, 3, 5, 1, ((1, 3), (0, 2))), (7, 8, 3, 2, "VALID")])
def test_depthwise_conv_and_its_gradients_equal_xlas(size, channels, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, channels)), jnp.float32)
    ours = grouped_conv(ops.conv_general_dilated, (stride, stride), padding, channels)
    theirs = grouped_conv(lax.conv_general_dilated, (stride, stride), padding, channels)
    expected, pullback = jax.vjp(theirs, x, w)
    g = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
    got, (dx, dw) = jax.jit(lambda x, w, g: (ours(x, w), jax.vjp(ours, x, w)[1](g)))(x, w, g)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for ours_grad, their_grad in zip((dx, dw), pullback(g)):
        np.testing.assert_allclose(ours_grad, their_grad, atol=2e-5)


def test_depthwise_conv_on_the_cpu_is_no_grouped_convolution():
    x, w = jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 1, 4))
    conv = grouped_conv(ops.conv_general_dilated, (1, 1), "SAME", 4)
    hlo = jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), (0, 1))).lower(x, w).as_text(
        dialect="hlo")
    assert jax.default_backend() == "cpu" and "feature_group_count" not in hlo


def test_other_convolutions_are_xlas():
    x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))  # grouped, not depthwise
    conv = grouped_conv(ops.conv_general_dilated, (1, 1), "SAME", 2)
    np.testing.assert_array_equal(conv(x, w), grouped_conv(lax.conv_general_dilated, (1, 1),
                                                           "SAME", 2)(x, w))


@pytest.mark.parametrize("window,stride,padding", [
    (3, 2, ((1, 1), (1, 1))), (3, 2, "SAME"), (2, 2, "VALID"), (3, 1, ((1, 1), (1, 1))),
    (3, 2, ((0, 1), (0, 1)))])
def test_max_pool_and_its_gradient_equal_xlas_without_ties(window, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
    pads = padding if isinstance(padding, str) else ((0, 0), *padding, (0, 0))
    theirs = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                                         (1, stride, stride, 1), pads)
    ours = lambda x: ops.max_pool(x, (window, window), (stride, stride), padding)
    expected, pullback = jax.vjp(theirs, x)
    g = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
    np.testing.assert_array_equal(ours(x), expected)
    np.testing.assert_allclose(jax.jit(lambda x, g: jax.vjp(ours, x)[1](g)[0])(x, g),
                               pullback(g)[0], atol=1e-6)  # overlapping windows add in turn


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window():
    """As PyTorch's MaxPool2d: after a ReLU, windows of zeros pass their gradient to the top
    left zero only."""
    x = jnp.zeros((1, 4, 4, 1)).at[0, 3, 3, 0].set(1.0)
    grad = jax.grad(lambda x: ops.max_pool(x, (2, 2), (2, 2), "VALID").sum())(x)[0, :, :, 0]
    expected = np.zeros((4, 4))
    expected[0, 0] = expected[0, 2] = expected[2, 0] = expected[3, 3] = 1.0
    np.testing.assert_array_equal(grad, expected)
