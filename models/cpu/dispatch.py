"""The CPU formulations of the operations ``models.layers`` builds on, and the choice of each.

Each public function equals the JAX or Flax operation its docstring names, on every backend, to
the tolerance stated there (tests/cpu/test_dispatch.py and test_native.py check them). On the
CPU backend (``lax.platform_dependent``) it may run another formulation: float32 work on the
native library (``models.cpu.native``, ``models.cpu.winograd``) where it is enabled, else a form
XLA:CPU compiles better than its own lowering (depthwise convolutions as sums over the taps, 1×1
ones as matrix products, strided ones with a phase-split input gradient, max pooling's gradient
to the first maximum). GPUs and TPUs keep XLA's lowering; ``batch_norm`` and ``gelu`` carry
their written-out gradients on every backend. ``conv_kernel`` is the one place that chooses a
convolution's formulation. ``TRANSFERLAB_NATIVE=0`` (``models.cpu.switches``) keeps all work off
the native library, ``TRANSFERLAB_WINOGRAD=0`` keeps 3×3 convolutions direct.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models.cpu import native, switches, winograd

Pads = tuple[tuple[int, int], tuple[int, int]]
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def conv_kernel(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                preferred_element_type=None) -> str:
    """Which formulation ``conv_general_dilated`` gives this convolution (its arguments) on the
    CPU, decided while tracing; the one place that decides it.

    NHWC, undilated, ungrouped, whose every output position sees every input position through
    a tap (a feature map no larger than the window, e.g. 1×1 or 2×2 under a 3×3 window, where
    the direct kernels spend their time on padding): "unrolled", one matrix product with the
    kernel unrolled into a (H·W·I, H'·W'·O) matrix of at most ``UNROLLED_MAX_ENTRIES``.
    Other NHWC undilated ones of one batch group and float32, with the native library enabled:
    "sgemm" (1×1, stride 1, unpadded, ungrouped, at least 128 channels in and out, where
    ``native.uses_mkl``); "winograd" (this project's: 3×3, stride 1, ungrouped, where
    ``_winograd_pays``, pads of at most 2, where oneDNN has no Winograd kernels);
    "onednn_winograd" (the other such 3×3 ones); else "onednn". Both Winograd forms become
    "onednn" where ``TRANSFERLAB_WINOGRAD=0``. Other NHWC undilated ones: "depthwise_taps",
    "pointwise" (ungrouped 1×1, unpadded) or "strided" (ungrouped). Everything else: "xla"."""
    if not _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                       batch_group_count, preferred_element_type):
        return "xla"
    strides, groups = tuple(window_strides), feature_group_count
    pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides)
    window, unpadded = tuple(rhs.shape[:2]), pads == ((0, 0), (0, 0))
    if groups == 1 and _unrolls(lhs.shape, rhs.shape, strides, pads):
        return "unrolled"
    if lhs.dtype == rhs.dtype == jnp.float32 and native.enabled():
        if (window == (1, 1) and strides == (1, 1) and groups == 1 and unpadded
                and min(rhs.shape[2:]) >= 128 and native.uses_mkl()):
            return "sgemm"
        if not (window == (3, 3) and strides == (1, 1) and groups == 1
                and switches.on("TRANSFERLAB_WINOGRAD")
                and _winograd_pays(min(rhs.shape[2:]), min(lhs.shape[1:3]))):
            return "onednn"
        own = winograd.takes(pads) and not native.onednn_has_winograd()
        return "winograd" if own else "onednn_winograd"
    if groups == lhs.shape[3] == rhs.shape[3] > 1 and rhs.shape[2] == 1:
        return "depthwise_taps"
    if groups == 1 and window == (1, 1) and unpadded:
        return "pointwise"
    if groups == 1 and strides != (1, 1):
        return "strided"
    return "xla"


def _winograd_pays(channels: int, side: int) -> bool:
    """Whether Winograd's 3×3 kernels beat direct ones for a convolution with ``channels`` in
    or out (the fewer) on maps of ``side`` (the shorter): 64 channels, or 32 on maps of 28 and
    more. Below, its transforms and oneDNN's reorders to its blocked layout cost more than the
    multiplies it saves."""
    return channels >= 64 or (channels >= 32 and side >= 28)


def _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, batch_group_count,
                preferred_element_type) -> bool:
    """Whether a convolution is NHWC × HWIO → NHWC, undilated, of one batch group, and computed
    in its operands' dtype: the ones with a CPU formulation here."""
    return (lhs.ndim == 4 and batch_group_count == 1
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
            and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
            and preferred_element_type in (None, lhs.dtype))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` (the one Flax's ``nn.Conv`` takes). On the CPU backend it
    runs the formulation ``conv_kernel`` names, each equal to XLA's lowering to float32
    rounding (values and gradients within 1e-4 for operands of unit scale, Winograd's within
    1e-5 of the largest); elsewhere, and for "xla", XLA's own."""
    conv = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
    kernel = conv_kernel(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count, batch_group_count,
                         preferred_element_type)
    if kernel == "xla":
        return conv(lhs, rhs)
    strides = tuple(window_strides)
    pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides)
    cpu = _formulation(kernel, strides, pads, feature_group_count)
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=conv)


def _formulation(kernel: str, strides, pads: Pads, groups: int):
    """The function of (lhs, rhs) that computes the convolution as ``kernel``."""
    if kernel == "unrolled":
        return lambda x, w: unrolled_conv(x, w, strides, pads)
    if kernel == "sgemm":
        return pointwise_dense
    if kernel == "winograd":
        return lambda x, w: winograd.conv(x, w, pads)
    if kernel in ("onednn", "onednn_winograd"):
        return lambda x, w: native.conv(x, w, strides, pads, groups, kernel == "onednn_winograd")
    if kernel == "depthwise_taps":
        return lambda x, w: depthwise_conv(x, w, strides, pads)
    if kernel == "pointwise":
        return lambda x, w: pointwise_conv(x, w, strides)
    return lambda x, w: strided_conv(x, w, strides, pads)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kw):
    """``lax.dot_general``. On the CPU, a product of ``lhs``'s trailing dimensions with
    ``rhs``'s leading ones (a Dense layer's) runs as one 2-D matrix product (``native.dense``
    for float32 where the native library is enabled), whose kernel gradient XLA computes
    without a transposed copy of the output gradient: values and gradients within 1e-4 of
    XLA's for operands of unit scale. Other products are XLA's own."""
    product = functools.partial(lax.dot_general, precision=precision,
                                preferred_element_type=preferred_element_type, **kw)
    general = lambda lhs, rhs: product(lhs, rhs, dimension_numbers)
    (lhs_contract, rhs_contract), batch = dimension_numbers
    k = len(lhs_contract)
    trailing_with_leading = (tuple(lhs_contract) == tuple(range(lhs.ndim - k, lhs.ndim))
                             and tuple(rhs_contract) == tuple(range(k)))
    if any(batch) or lhs.ndim - k < 2 or not trailing_with_leading:
        return general(lhs, rhs)

    on_onednn = (lhs.dtype == rhs.dtype == jnp.float32
                 and preferred_element_type in (None, jnp.float32) and native.enabled())

    def matmul(lhs, rhs):
        rows, cols = lhs.shape[:lhs.ndim - k], rhs.shape[k:]
        matrix = rhs.reshape(-1, math.prod(cols))
        if on_onednn:
            out = native.dense(lhs.reshape(rows[0], math.prod(rows[1:]), -1), matrix)
        else:
            out = product(lhs.reshape(math.prod(rows), -1), matrix, (((1,), (0,)), ((), ())))
        return out.reshape(*rows, *cols)
    return lax.platform_dependent(lhs, rhs, cpu=matmul, default=general)


@jax.custom_vjp
def add_to_each_image(x, y):
    """``x + y`` for ``x`` (batch, ...) and ``y`` (1, ...) of one dtype, e.g. a position
    embedding, on every backend. ``y``'s gradient, the sum over the batch, is a product with a
    vector of ones (in float32), which XLA:CPU computes faster than a reduction over a leading
    axis: broadcasting's gradients to 2e-5."""
    return x + y


def _add_to_each_image_fwd(x, y):
    return x + y, None


def _add_to_each_image_bwd(_, g):
    ones = jnp.ones((1, g.shape[0]), g.dtype)
    total = jnp.dot(ones, g.reshape(g.shape[0], -1), preferred_element_type=jnp.float32)
    return g, total.reshape(1, *g.shape[1:]).astype(g.dtype)


add_to_each_image.defvjp(_add_to_each_image_fwd, _add_to_each_image_bwd)


def materialize(x):
    """``x`` exactly, and so its gradient, each written to memory once for all of its
    consumers, where XLA:CPU would fuse a cheap elementwise value (a residual block's sum) into
    each consumer and recompute it there. On the CPU through ``native.materialize``, which
    computes nothing, where the native library is enabled; otherwise ``x`` as it is."""
    if x.ndim == 0 or not native.enabled():
        return x
    return lax.platform_dependent(x, cpu=native.materialize, default=lambda x: x)


@jax.custom_vjp
def residual_relu(x):
    """``jax.nn.relu(x)`` of a residual block's sum, values and gradient exactly (zeros
    included), written once (``materialize``); the gradient is masked by where the output is
    positive, reading the output rather than recomputing the sum for the mask."""
    return materialize(jax.nn.relu(x))


def _residual_relu_fwd(x):
    y = residual_relu(x)
    return y, y


def _residual_relu_bwd(y, g):
    return (materialize(jnp.where(y > 0, g, jnp.zeros((), g.dtype))),)


residual_relu.defvjp(_residual_relu_fwd, _residual_relu_bwd)


def self_attention(qkv, bias):
    """``jax.nn.dot_product_attention`` (no mask or bias) of the (batch, tokens, heads, depth)
    q, k, v packed in ``qkv + bias``, ``qkv`` (batch, tokens, 3, heads, depth) as one Dense
    layer's product with the three kernels side by side, ``bias`` (3, heads, depth) the
    layer's. On the CPU, ``native.self_attention`` for float32 where the native library is
    enabled (its tolerance); else two batched matrix products over (batch × heads) with the
    softmax between them, on head-major copies (values and gradients within 2e-5)."""
    return lax.platform_dependent(
        qkv, bias, cpu=_cpu_self_attention,
        default=lambda qkv, bias: jax.nn.dot_product_attention(*_unpack(qkv + bias)))


def _unpack(qkv):
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _cpu_self_attention(qkv, bias):
    if qkv.dtype == bias.dtype == jnp.float32 and native.enabled():
        return native.self_attention(qkv, bias)
    return _head_major_attention(*_unpack(qkv + bias))


def _head_major_attention(query, key, value):
    batch, tokens, heads, depth = query.shape
    q, k, v = (x.transpose(0, 2, 1, 3).reshape(batch * heads, -1, depth)
               for x in (query, key, value))
    logits = lax.dot_general(q * (depth ** -0.5), k, (((2,), (2,)), ((0,), (0,))))
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
    out = lax.dot_general(weights, v, (((2,), (1,)), ((0,), (0,))))
    return out.reshape(batch, heads, tokens, depth).transpose(0, 2, 1, 3)


UNROLLED_MAX_ENTRIES = 1 << 24  # 64 MiB of float32 kernel matrix


def _taps_per_axis(in_hw, window, strides, pads: Pads) -> list[np.ndarray]:
    """For each spatial axis, the (in, out) tap joining each input position to each output
    position, -1 where no tap does."""
    per_axis = []
    for size, k, s, (lo, hi) in zip(in_hw, window, strides, pads):
        out = (size + lo + hi - k) // s + 1
        tap = np.arange(size)[:, None] - s * np.arange(out)[None, :] + lo
        per_axis.append(np.where((tap >= 0) & (tap < k), tap, -1))
    return per_axis


def _joined_taps(rows: np.ndarray, cols: np.ndarray, window_width: int) -> np.ndarray:
    """(H·W, H'·W') tap indices (row-major in the window) from ``_taps_per_axis``'s two."""
    taps = rows[:, None, :, None] * window_width + cols[None, :, None, :]
    return taps.reshape(rows.shape[0] * cols.shape[0], rows.shape[1] * cols.shape[1])


def _unrolls(lhs_shape, rhs_shape, strides, pads: Pads) -> bool:
    rows, cols = _taps_per_axis(lhs_shape[1:3], rhs_shape[:2], strides, pads)
    entries = rows.size * cols.size * rhs_shape[2] * rhs_shape[3]
    return bool((rows >= 0).all() and (cols >= 0).all()) and entries <= UNROLLED_MAX_ENTRIES


def unrolled_conv(x, w, strides, pads: Pads):
    """Convolution of NHWC ``x`` with an HWIO kernel ``w``, where every output position sees
    every input position, as one matrix product (``dot_general``) of each image's (H·W·I)
    values with the kernel unrolled into a (H·W·I, H'·W'·O) matrix."""
    rows, cols = _taps_per_axis(x.shape[1:3], w.shape[:2], strides, pads)
    taps = _joined_taps(rows, cols, w.shape[1])
    if np.array_equal(taps, np.arange(taps.size)[:, None]):  # one output, each tap in order
        kernel = w.reshape(-1, w.shape[3])
    else:
        kernel = _unrolled_kernel(w, tuple(map(tuple, taps.tolist())))
    out = dot_general(x.reshape(x.shape[0], 1, -1), kernel, (((2,), (0,)), ((), ())))
    return out.reshape(x.shape[0], rows.shape[1], cols.shape[1], w.shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _unrolled_kernel(w, taps: tuple[tuple[int, ...], ...]):
    """The (Q·I, P·O) matrix whose (q, p) block is the tap ``taps[q][p]`` of HWIO ``w``; its
    gradient sums each tap's blocks."""
    by_tap = w.reshape(-1, *w.shape[2:])
    blocks = jnp.stack([jnp.stack([by_tap[t] for t in row], axis=1) for row in taps])
    return blocks.reshape(len(taps) * w.shape[2], -1)


def _unrolled_kernel_fwd(w, taps):
    return _unrolled_kernel(w, taps), w.shape


def _unrolled_kernel_bwd(taps, shape, g):
    blocks = g.reshape(len(taps), shape[2], len(taps[0]), shape[3])
    zeros = jnp.zeros(shape[2:], g.dtype)
    per_tap = [sum((blocks[q, :, p] for q, row in enumerate(taps) for p, t in enumerate(row)
                    if t == tap), zeros) for tap in range(shape[0] * shape[1])]
    return (jnp.stack(per_tap).reshape(shape),)


_unrolled_kernel.defvjp(_unrolled_kernel_fwd, _unrolled_kernel_bwd)


def pointwise_dense(x, w):
    """Stride-1 1×1 convolution of NHWC ``x`` with a (1, 1, I, O) kernel as ``native.dense``
    over each image's pixels."""
    out = native.dense(x.reshape(x.shape[0], -1, x.shape[3]), w[0, 0])
    return out.reshape(*x.shape[:3], w.shape[3])


def pointwise_conv(x, w, strides: Sequence[int]):
    """1×1 convolution of NHWC ``x`` with an HWIO kernel ``w`` of shape (1, 1, I, O)."""
    x = x[:, ::strides[0], ::strides[1]]
    return jnp.dot(x.reshape(-1, x.shape[3]), w[0, 0]).reshape(*x.shape[:3], w.shape[3])


def _conv(x, w, strides, pads: Pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def _with_gradients(forward, input_grad, kernel_grad):
    """``forward(x, w, strides, pads)`` differentiated by ``input_grad`` and ``kernel_grad``,
    functions of (x, w, g, strides, pads)."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def conv(x, w, strides: tuple[int, int], pads: Pads):
        return forward(x, w, strides, pads)

    def backward(strides, pads, residuals, g):
        x, w = residuals
        return input_grad(x, w, g, strides, pads), kernel_grad(x, w, g, strides, pads)

    conv.defvjp(lambda x, w, strides, pads: (forward(x, w, strides, pads), (x, w)), backward)
    return conv


def _kernel_grad_of(forward):
    def kernel_grad(x, w, g, strides, pads: Pads):
        return jax.vjp(lambda w: forward(x, w, strides, pads), w)[1](g)[0]
    return kernel_grad


def _strided_conv_input_grad(x, w, g, strides, pads: Pads):
    """The input gradient as one stride-1 convolution of ``g`` per phase of the stride (the
    input positions ≡ (a, b) mod ``strides``), each with the taps that reach that phase,
    where XLA's own lowering convolves a zero-dilated ``g`` with every tap."""
    dx = jnp.zeros_like(x)
    for phase in itertools.product(*map(range, strides)):
        taps = [_phase_taps(k, s, lo, a) for k, s, (lo, _), a in
                zip(w.shape[:2], strides, pads, phase)]
        if not all(taps):
            continue
        counts = [-(-(size - a) // s) for size, a, s in zip(x.shape[1:3], phase, strides)]
        offsets = [[(a + lo - t) // s for t in ts] for ts, a, (lo, _), s in
                   zip(taps, phase, pads, strides)]
        g_pads = [(-d[0], count + len(d) - 1 - (n - d[0])) for d, count, n in
                  zip(offsets, counts, g.shape[1:3])]
        kernel = jnp.swapaxes(w[jnp.array(taps[0])][:, jnp.array(taps[1])], 2, 3)
        part = _conv(_pad_hw(g, g_pads), kernel, (1, 1), ((0, 0), (0, 0)))
        dx = dx + _place_tap(part, phase, strides, x.shape[1:3])
    return dx


def _phase_taps(size: int, stride: int, pad: int, phase: int) -> list[int]:
    """The taps that reach input positions ≡ ``phase`` (mod ``stride``), last tap first."""
    return [t for t in range(size - 1, -1, -1) if (phase + pad - t) % stride == 0]


# Convolution of NHWC ``x`` with an HWIO kernel ``w`` at ``strides`` > 1.
strided_conv = _with_gradients(_conv, _strided_conv_input_grad, _kernel_grad_of(_conv))


def _explicit_pads(padding, spatial: Sequence[int], window: Sequence[int], strides) -> Pads:
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(spatial, window, strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _taps(x, window: Sequence[int], strides: Sequence[int], out_hw: Sequence[int]):
    """The strided slices of padded ``x`` that meet each tap of the window, row-major."""
    n, _, _, c = x.shape
    return [lax.slice(x, (0, i, j, 0),
                      (n, i + (out_hw[0] - 1) * strides[0] + 1,
                       j + (out_hw[1] - 1) * strides[1] + 1, c), (1, *strides, 1))
            for i in range(window[0]) for j in range(window[1])]


def _output_hw(padded_hw, window, strides) -> tuple[int, int]:
    return tuple((size - k) // s + 1 for size, k, s in zip(padded_hw, window, strides))


def _pad_hw(x, pads: Pads, value=0.0):
    return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0),
                                                    (0, 0, 0)))


def _tap_sum(x, w, strides, pads: Pads):
    xp = _pad_hw(x, pads)
    window = w.shape[:2]
    taps = _taps(xp, window, strides, _output_hw(xp.shape[1:3], window, strides))
    weights = w.reshape(-1, w.shape[-1])
    return sum(tap * weights[k] for k, tap in enumerate(taps))


def _tap_sum_input_grad(x, w, g, strides, pads: Pads):
    return jax.vjp(lambda x: _tap_sum(x, w, strides, pads), x)[1](g)[0]


def _tap_sum_kernel_grad_per_image(x, w, g, strides, pads: Pads):
    kernel_grad = _kernel_grad_of(_tap_sum)

    def add_image(dw, image_and_grad):
        image, grad = image_and_grad
        return dw + kernel_grad(image[None], w, grad[None], strides, pads), None
    return lax.scan(add_image, jnp.zeros_like(w), (x, g))[0]


# Depthwise convolution of NHWC ``x`` with an HWIO kernel ``w`` of shape (kh, kw, 1, C).
depthwise_conv = _with_gradients(_tap_sum, _tap_sum_input_grad, _tap_sum_kernel_grad_per_image)


def max_pool(x, window: Sequence[int], strides: Sequence[int], padding: str | Pads):
    """Max pooling of NHWC ``x`` over ``window``, padded with -inf (``padding`` "SAME", "VALID"
    or ((top, bottom), (left, right))): ``lax.reduce_window``'s max, exactly (NaN wins). On the
    CPU the gradient goes to the first maximum (row-major) of each window, as PyTorch's
    ``MaxPool2d``: without ties, ``lax.reduce_window``'s gradient to 1e-6. Float32 runs on
    ``native.max_pool`` where the native library is enabled, else a loop over the window's taps;
    other backends keep ``lax.reduce_window`` and its gradient."""
    window, strides = tuple(window), tuple(strides)
    pads = _explicit_pads(padding, x.shape[1:3], window, strides)
    return lax.platform_dependent(
        x, cpu=lambda x: _max_pool_first_max_grad(x, window, strides, pads),
        default=lambda x: _reduce_window_max(x, window, strides, pads))


def _reduce_window_max(x, window, strides, pads: Pads):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *pads, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_first_max_grad(x, window, strides, pads: Pads):
    if x.dtype == jnp.float32 and native.enabled():
        return native.max_pool(x, window, strides, pads)
    return _reduce_window_max(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
    y = _max_pool_first_max_grad(x, window, strides, pads)
    return y, (x, y)


def _max_pool_bwd(window, strides, pads, residuals, g):
    """Each output's gradient goes to the first tap (row-major) that holds its maximum."""
    x, y = residuals
    if x.dtype == g.dtype == jnp.float32 and native.enabled():
        return (native.max_pool_backward(x, y, g, window, strides, pads),)
    xp = _pad_hw(x, pads, -jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros_like(xp)
    for k, tap in enumerate(_taps(xp, window, strides, y.shape[1:3])):
        i, j = divmod(k, window[1])
        first = (tap == y) & ~taken
        taken = taken | first
        dxp = dxp + _place_tap(jnp.where(first, g, 0), (i, j), strides, xp.shape[1:3])
    (top, _), (left, _) = pads
    return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


def _place_tap(values, offset, strides, padded_hw):
    """``values`` (one per output) at the input positions of the tap at ``offset``, zeros
    elsewhere: the transpose of ``_taps``' strided slice."""
    out_hw = values.shape[1:3]
    highs = [size - (o + (n - 1) * s + 1) for size, o, n, s in
             zip(padded_hw, offset, out_hw, strides)]
    return lax.pad(values, jnp.zeros((), values.dtype),
                   ((0, 0, 0), (offset[0], highs[0], strides[0] - 1),
                    (offset[1], highs[1], strides[1] - 1), (0, 0, 0)))


_max_pool_first_max_grad.defvjp(_max_pool_fwd, _max_pool_bwd)


def layer_norm(x, scale, bias, epsilon: float):
    """Normalizes each row of ``x`` (its last axis) to zero mean and unit variance (the variance
    of the centred values), then scales and shifts it: Flax's ``nn.LayerNorm``, computed in
    float32: Flax's values and gradients within 1e-4 for inputs of unit scale. On the CPU, for
    float32 with the native library enabled, ``native.layer_norm`` each way."""
    on_native = (x.dtype == scale.dtype == bias.dtype == jnp.float32 and x.ndim >= 2
              and native.enabled())
    if not on_native:
        return _layer_norm_formula(x, scale, bias, epsilon)
    return lax.platform_dependent(
        x, scale, bias, cpu=lambda *a: _native_layer_norm(*a, epsilon),
        default=lambda *a: _layer_norm_formula(*a, epsilon))


def _layer_norm_formula(x, scale, bias, epsilon: float):
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    rstd = lax.rsqrt((centred * centred).mean(-1, keepdims=True) + epsilon)
    return (centred * rstd * scale + bias).astype(x.dtype)


def _as_rows(x):
    return x.reshape(x.shape[0], -1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native_layer_norm(x, scale, bias, epsilon: float):
    return native.layer_norm(_as_rows(x), scale, bias, epsilon).reshape(x.shape)


def _native_layer_norm_fwd(x, scale, bias, epsilon):
    return _native_layer_norm(x, scale, bias, epsilon), (x, scale)


def _native_layer_norm_bwd(epsilon, residuals, dy):
    x, scale = residuals
    dx, sums = native.layer_norm_backward(_as_rows(x), scale, _as_rows(dy), epsilon)
    total = sums.sum(0)
    return dx.reshape(x.shape), total[0], total[1]


_native_layer_norm.defvjp(_native_layer_norm_fwd, _native_layer_norm_bwd)


def hard_sigmoid(x):
    return jax.nn.relu6(x + 3.0) / 6.0


def hard_swish(x):
    return x * hard_sigmoid(x)


@jax.custom_vjp
def gelu(x):
    """The exact GELU, x·Φ(x) = x·(1 + erf(x/√2))/2, as PyTorch writes it: ``jax.nn.gelu(x,
    approximate=False)`` within 2e-6, values and gradient, on every backend, without the erfc
    that XLA expands into both of its branches. The gradient recomputes Φ(x) and the density
    from ``x``, the one value kept."""
    return 0.5 * x * (1.0 + lax.erf(x * _SQRT_HALF))


_SQRT_HALF = 0.5 ** 0.5


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    cdf = 0.5 * (1.0 + lax.erf(x * _SQRT_HALF))
    density = jnp.exp(-0.5 * x * x) * (2.0 * math.pi) ** -0.5
    return (g * (cdf + x * density),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def bias_gelu(x, bias):
    """``gelu(x + bias)``: a Dense layer's bias and activation, ``gelu``'s values and gradients
    within 1e-5. On the CPU, for float32 with the native library enabled, the gradient is one
    pass (``native.gelu_backward``) that adds the bias itself, takes Φ from the output and sums
    the bias's gradient."""
    if not (x.dtype == bias.dtype == jnp.float32 and x.ndim >= 2 and native.enabled()):
        return gelu(x + bias)
    return lax.platform_dependent(x, bias, cpu=_native_bias_gelu,
                                  default=lambda x, bias: gelu(x + bias))


@jax.custom_vjp
def _native_bias_gelu(x, bias):
    return gelu(x + bias)


def _native_bias_gelu_fwd(x, bias):
    y = gelu(x + bias)
    return y, (x, bias, y)


def _native_bias_gelu_bwd(residuals, dy):
    x, bias, y = residuals
    du, sums = native.gelu_backward(_as_rows(x), bias, _as_rows(y), _as_rows(dy))
    return du.reshape(x.shape), sums.sum(0)


_native_bias_gelu.defvjp(_native_bias_gelu_fwd, _native_bias_gelu_bwd)


def _silu_derivative(pre):
    """SiLU's derivative, with the sigmoid as 0.5·(1 + tanh(pre/2)): written as the forward
    pass's, XLA would compute it once for both passes and keep it for the gradient."""
    s = 0.5 + 0.5 * jnp.tanh(0.5 * pre)
    return s * (1.0 + pre * (1.0 - s))


def _hard_swish_derivative(pre):
    return jnp.where(pre < -3.0, 0.0, jnp.where(pre > 3.0, 1.0, (2.0 * pre + 3.0) / 6.0))


# The activations ``batch_norm`` applies itself, by name: (function, derivative).
ACTIVATIONS = {
    "relu": (jax.nn.relu, lambda pre: (pre > 0.0).astype(pre.dtype)),
    "relu6": (jax.nn.relu6, lambda pre: ((pre > 0.0) & (pre < 6.0)).astype(pre.dtype)),
    "silu": (jax.nn.silu, _silu_derivative),
    "hard_swish": (hard_swish, _hard_swish_derivative),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(x, scale, bias, eps: float, activation: str | None = None):
    """Normalizes ``x`` over all axes but the last with its batch statistics, then applies the
    named ``activation`` (a key of ``ACTIVATIONS``, or None): returns (``y``, mean, variance)
    in float32, the variance as E[x²] − E[x]² (Flax's fast variance): ``nn.BatchNorm`` in
    training mode followed by the activation, and autodiff of that formulation, to 1e-4
    (values, statistics and gradients). On every backend the gradient is written out: two sums
    and one elementwise loop, the activation's derivative recomputed from ``x`` (on the CPU
    from ``y`` too, SiLU's without an exponential); each pair of sums is one pass of
    ``native.batch_norm_sums`` / ``batch_norm_grad_sums`` for float32 where enabled."""
    return _batch_norm_fwd(x, scale, bias, eps, activation)[0]


def _native_sums(x) -> bool:
    return x.dtype == jnp.float32 and x.ndim == 4 and native.enabled()


def _batch_stats(x):
    axes = tuple(range(x.ndim - 1))
    count = math.prod(x.shape[:-1])

    def xla(x):
        x32 = x.astype(jnp.float32)
        return x32.sum(axes), (x32 * x32).sum(axes)

    def on_native(x):
        total = native.batch_norm_sums(x).sum(0)
        return total[0], total[1]
    sums = (lax.platform_dependent(x, cpu=on_native, default=xla) if _native_sums(x) else xla(x))
    mean = sums[0] / count
    return mean, jnp.maximum(sums[1] / count - mean * mean, 0.0)


def _affine(scale, bias, mean, rstd):
    """(a, b) with a·x + b = (x − mean)·rstd·scale + bias."""
    a = scale * rstd
    return a, bias - mean * a


def _batch_norm_fwd(x, scale, bias, eps, activation):
    mean, var = _batch_stats(x)
    rstd = lax.rsqrt(var + eps)
    a, b = _affine(scale, bias, mean, rstd)
    y = x.astype(jnp.float32) * a + b
    if activation is not None:
        y = ACTIVATIONS[activation][0](y)
    # the native gradient reads y: kept by the layer that follows anyway, in float32 there
    kept_y = y if activation is not None and _native_sums(x) else None
    return (y, mean, var), (x, kept_y, mean, rstd, scale, bias)


def _grad_sums(x, y, dy, a, b, mean, activation):
    """(Σ g, Σ g·(x − mean)) over all axes but the last, and g = dy · act'(a·x + b)."""
    axes = tuple(range(x.ndim - 1))

    def xla(x, dy):
        x32 = x.astype(jnp.float32)
        g = dy.astype(jnp.float32)
        if activation is not None:
            g = g * ACTIVATIONS[activation][1](x32 * a + b)
        return g.sum(axes), (g * (x32 - mean)).sum(axes), g

    def on_native(x, dy):
        sums, g = native.batch_norm_grad_sums(x, y, dy, a, b, mean, activation)
        total = sums.sum(0)
        return total[0], total[1], g
    if _native_sums(x) and dy.dtype == jnp.float32:
        return lax.platform_dependent(x, dy, cpu=on_native, default=xla)
    return xla(x, dy)


def _batch_norm_bwd(eps, activation, residuals, cotangents):
    """The gradient in two passes over ``x``: the two sums (and g), then one elementwise loop."""
    x, y, mean, rstd, scale, bias = residuals
    dmean, dvar = (c.astype(jnp.float32) for c in cotangents[1:])
    count = math.prod(x.shape[:-1])
    a, b = _affine(scale, bias, mean, rstd)
    sum_g, sum_gc, g = _grad_sums(x, y, cotangents[0], a, b, mean, activation)
    centred = x.astype(jnp.float32) - mean
    dx = (a * (g - sum_g / count - centred * (rstd * rstd * sum_gc / count))
          + (dmean + 2.0 * dvar * centred) / count)
    return dx.astype(x.dtype), sum_gc * rstd, sum_g


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
