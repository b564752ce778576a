"""Winograd's F(4×4, 3×3) convolution (models/cpu/winograd.py) against XLA's, on any CPU: its
values and both gradients, ragged tiles and asymmetric padding, a sharded batch, where it is
chosen, and inside a ResNet's train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models.cpu import dispatch, native, winograd
from tests.cpu.test_dispatch import NHWC
from tests.cpu.test_native import (assert_resnet_gradients_equal_xlas, compiled_text, conv_of,
                                   needs_native, split_over_devices)

TRANSFORMS = ("transferlab_onednn_winograd_input", "transferlab_onednn_winograd_output",
              "transferlab_onednn_winograd_grad")


def values_and_gradients(conv, x, w, g):
    y, pullback = jax.vjp(conv, x, w)
    return (y, *pullback(g))


def assert_close_to_xlas(x, w, pads, tolerance=1e-5):
    """Winograd's output and gradients within ``tolerance`` of the largest of XLA's."""
    xla = conv_of(lax.conv_general_dilated, (1, 1), pads)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(xla(x, w).shape), jnp.float32)
    ours = jax.jit(lambda x, w, g: values_and_gradients(
        lambda x, w: winograd.conv(x, w, pads), x, w, g))(x, w, g)
    for got, expected in zip(ours, values_and_gradients(xla, x, w, g)):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()


def random_conv(shape, channels_out, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = rng.standard_normal((3, 3, shape[-1], channels_out)) / np.sqrt(9 * shape[-1])
    return x, jnp.asarray(w, jnp.float32)


@needs_native
@pytest.mark.parametrize("shape,channels_out,pads", [
    ((2, 9, 10, 5), 7, ((1, 1), (1, 1))),     # tiles past both edges, channels < a block
    ((3, 13, 8, 3), 20, ((0, 0), (2, 1))),    # asymmetric, unpadded rows
    ((1, 4, 4, 33), 17, ((2, 2), (0, 1))),    # more output than input, a ragged channel block
    ((2, 16, 16, 32), 48, ((1, 1), (1, 1))),  # whole tiles, whole blocks
    ((1, 3, 3, 16), 16, ((0, 0), (0, 0)))])   # one output pixel
def test_values_and_gradients_equal_xlas(shape, channels_out, pads):
    assert_close_to_xlas(*random_conv(shape, channels_out), pads)


@needs_native
def test_each_pass_is_transforms_around_one_native_product():
    x, w = random_conv((2, 8, 8, 16), 16)
    loss = lambda x, w: (winograd.conv(x, w, ((1, 1), (1, 1))) ** 2).sum()
    text = compiled_text(jax.grad(loss, (0, 1)), x, w)
    # the forward pass and the input gradient's: an input and an output transform each; the
    # kernel gradient: the output gradient's, and the input's, which XLA shares with the forward
    counts = [text.count(f'custom_call_target="{t}"') for t in TRANSFORMS]
    assert counts == [2, 2, 1]
    assert text.count('custom_call_target="transferlab_onednn_matmul"') == 3
    assert "transferlab_onednn_forward" not in text and "convolution(" not in text


@needs_native
def test_each_device_transforms_its_shard_of_the_batch():
    x, w = random_conv((8, 10, 10, 8), 12)
    pads = ((1, 1), (1, 1))
    loss = lambda conv: lambda x, w: (conv(x, w) ** 2).sum()
    grads = jax.grad(loss(lambda x, w: winograd.conv(x, w, pads)), (0, 1))
    sharded = split_over_devices(x)
    text = compiled_text(grads, sharded, w)
    assert "all-gather" not in text and TRANSFORMS[0] in text
    expected = jax.grad(loss(conv_of(lax.conv_general_dilated, (1, 1), pads)), (0, 1))(x, w)
    for ours, theirs in zip(jax.jit(grads)(sharded, w), expected):
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


def fake_cpu(monkeypatch, flags: str):
    monkeypatch.setattr(native, "cpu_info", lambda: {"flags": flags})


@pytest.mark.usefixtures("winograd")
def test_runs_where_onednn_has_no_winograd_kernels(monkeypatch):
    monkeypatch.setattr(native, "enabled", lambda: True)  # the choice, library or not

    def kernel(shape=(3, 3, 64, 64), strides=(1, 1), pads=((1, 1), (1, 1)), groups=1, side=8):
        x = jnp.zeros((2, side, side, shape[2] * groups))
        return dispatch.conv_kernel(x, jnp.zeros(shape), strides, pads, dimension_numbers=NHWC,
                                    feature_group_count=groups)
    fake_cpu(monkeypatch, "fpu sse2 avx avx2 fma")
    assert kernel() == kernel(shape=(3, 3, 32, 48), side=28) == "winograd"
    assert kernel(strides=(2, 2)) == kernel(shape=(5, 5, 64, 64)) == "onednn"
    assert kernel(shape=(3, 3, 16, 64), groups=4) == "onednn"
    # too few channels for the transforms to pay: 16 anywhere, 32 on maps under 28
    assert kernel(shape=(3, 3, 16, 64), side=32) == kernel(shape=(3, 3, 32, 32)) == "onednn"
    assert kernel(pads=((3, 1), (1, 1))) == "onednn_winograd"  # oneDNN's, direct without them
    fake_cpu(monkeypatch, "avx2 avx512f avx512dq avx512bw avx512vl")
    assert kernel() == "onednn_winograd"
    assert kernel(shape=(3, 3, 16, 16), side=32) == "onednn"
    fake_cpu(monkeypatch, "avx2")
    monkeypatch.setenv("TRANSFERLAB_WINOGRAD", "0")
    assert kernel() == "onednn"


@needs_native
@pytest.mark.usefixtures("winograd")
def test_3x3_stride_1_convolutions_take_it_on_cpus_without_avx512(monkeypatch):
    fake_cpu(monkeypatch, "avx2")
    x, w = random_conv((2, 8, 8, 64), 64)
    conv = conv_of(dispatch.conv_general_dilated, (1, 1), "SAME")
    assert TRANSFORMS[0] in compiled_text(conv, x, w)
    fake_cpu(monkeypatch, "avx2 avx512f avx512dq avx512bw avx512vl")
    text = compiled_text(lambda x, w: conv(x, w), x, w)  # a new function: a new trace
    assert TRANSFORMS[0] not in text and "winograd = 1" in text


@needs_native
@pytest.mark.usefixtures("winograd")
def test_resnet_train_step_gradients_equal_xlas(monkeypatch):
    fake_cpu(monkeypatch, "avx2")
    assert TRANSFORMS[2] in assert_resnet_gradients_equal_xlas()
