"""The layers every model family is built of: convolution, dense, normalisation, pooling,
attention, residual sums and the classifier head, each equal to its Flax or PyTorch
counterpart (same variables, same values).

This module is the one seam between the architectures and the CPU speed layer
(``models.cpu``): the layers compute through that layer, which runs a faster formulation on
the CPU where it has one (``models.cpu.switches`` turns its parts off). The architectures use
these layers and never ``models.cpu`` itself.

Padding follows the source of the weights: ``"torch"`` pads symmetrically by ``k // 2``
(times the dilation), ``"same"`` is TensorFlow's asymmetric SAME padding. BatchNorm defaults
follow PyTorch (momentum 0.1, i.e. Flax's 0.9, epsilon 1e-5); Keras weights use epsilon 1e-3.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import cpu

Dtype = Any
Activation = Callable[[jax.Array], jax.Array]
Initializer = Callable[..., jax.Array]

TORCH_BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1 in Flax's convention.
TORCH_BN_EPS = 1e-5

# PyTorch's default initialisers, so that training from scratch behaves like the reference.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.lecun_normal()


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_padding(kernel_size, dilation=1, padding: str = "torch"):
    """Padding for ``nn.Conv``: symmetric ``(k - 1) // 2 * d`` for "torch", SAME for "same"."""
    if padding == "same":
        return "SAME"
    if padding == "valid":
        return "VALID"
    if padding != "torch":
        raise ValueError(f"padding must be 'torch', 'same' or 'valid', got {padding!r}")
    kh, kw = pair(kernel_size)
    dh, dw = pair(dilation)
    return (((kh - 1) // 2 * dh,) * 2, ((kw - 1) // 2 * dw,) * 2)


def Conv(features: int, kernel_size=3, strides=1, *, groups: int = 1, dilation=1,
         padding: str | Any = "torch", use_bias: bool = False, dtype: Dtype = jnp.float32,
         name: str | None = None, kernel_init=conv_init) -> nn.Conv:
    """A 2-D convolution in the source's padding convention (see module docstring)."""
    pad = conv_padding(kernel_size, dilation, padding) if isinstance(padding, str) else padding
    return nn.Conv(features, pair(kernel_size), pair(strides), padding=pad,
                   feature_group_count=groups, kernel_dilation=pair(dilation),
                   use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name,
                   conv_general_dilated=cpu.conv_general_dilated)


hard_sigmoid, hard_swish, gelu = cpu.hard_sigmoid, cpu.hard_swish, cpu.gelu  # gelu: exact


class Dense(nn.Module):
    """``nn.Dense`` over the last axis (same variables: ``kernel`` (in, features), ``bias``;
    same values), its product the CPU layer's ``dot_general``, then ``act`` (None: none). With
    ``act=gelu`` the bias and the GELU are one operation (``cpu.bias_gelu``)."""

    features: int
    act: Activation | None = None
    kernel_init: Initializer = dense_init
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        y, bias = _product(x, kernel, self.dtype), bias.astype(self.dtype)
        if self.act is gelu:
            return cpu.bias_gelu(y, bias)
        y = y + bias
        return y if self.act is None else self.act(y)


class ClassifierHead(Dense):
    """Dropout at rate ``dropout`` while training, then the Dense layer to the logits. Used as
    ``name="head"``, its variables are ``head/kernel`` and ``head/bias``."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        return super().__call__(nn.Dropout(self.dropout, deterministic=not train)(x))


def _product(x, kernel, dtype):
    """x·kernel over x's last axis, for a (fan-in, fan-out) ``kernel``, in ``dtype``."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    return cpu.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


# The activations ``cpu.batch_norm`` applies itself, by the functions models pass.
_FUSED_ACTIVATIONS = {function: name for name, (function, _) in cpu.ACTIVATIONS.items()}


class FusedBatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` followed by ``act`` (None: none), whose training pass over NHWC
    features differentiates through ``cpu.batch_norm``: the gradient in one loop after two
    sums, where autodiff of Flax's formulation takes more passes over the activations, and the
    activation's derivative recomputed from the input (for those ``cpu.batch_norm`` knows).
    Same variables, same values."""

    act: Activation | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = nn.merge_param("use_running_average", self.use_running_average,
                                 use_running_average)
        if (running or self.is_initializing() or mask is not None
                or self.axis not in (-1, x.ndim - 1) or self.axis_name is not None
                or not (self.use_scale and self.use_bias) or not self.force_float32_reductions):
            return self._activate(super().__call__(x, use_running_average, mask=mask))
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        fused = _FUSED_ACTIVATIONS.get(self.act)
        y, mean, var = cpu.batch_norm(x, scale, bias, self.epsilon, fused)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        y = y.astype(self.dtype or jnp.result_type(x, scale, bias))
        return y if fused else self._activate(y)

    def _activate(self, y):
        return y if self.act is None else self.act(y)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis through ``cpu.layer_norm`` (one native pass over
    memory each way on the CPU), the variance that of the centred values. Same variables; the
    other forms (other axes, no scale or bias, a mask, an ``axis_name``) are Flax's own."""

    @nn.compact
    def __call__(self, x, *, mask=None):
        if (mask is not None or self.axis_name is not None or not (self.use_scale and self.use_bias)
                or self.reduction_axes not in (-1, x.ndim - 1)
                or self.feature_axes not in (-1, x.ndim - 1)):
            return super().__call__(x, mask=mask)
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        x, scale, bias = (v.astype(dtype) for v in (x, scale, bias))
        return cpu.layer_norm(x, scale, bias, self.epsilon)


def BatchNorm(train: bool, *, eps: float = TORCH_BN_EPS, momentum: float = TORCH_BN_MOMENTUM,
              dtype: Dtype = jnp.float32, act: Activation | None = None, name: str | None = None,
              **kw) -> nn.BatchNorm:
    """BatchNorm, then ``act``, that uses batch statistics when ``train`` and running
    statistics otherwise."""
    return FusedBatchNorm(use_running_average=not train, momentum=momentum, epsilon=eps,
                          dtype=dtype, act=act, name=name, **kw)


class ConvBN(nn.Module):
    """Conv → BatchNorm → activation, as torchvision's ``Conv2dNormActivation`` and
    Inception's ``BasicConv2d``. Parameters live under ``conv`` and ``bn``."""

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    groups: int = 1
    dilation: int = 1
    act: Activation | None = nn.relu
    padding: str | Any = "torch"
    use_bias: bool = False
    bn_eps: float = TORCH_BN_EPS
    bn_momentum: float = TORCH_BN_MOMENTUM
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(self.features, self.kernel_size, self.strides, groups=self.groups,
                 dilation=self.dilation, padding=self.padding, use_bias=self.use_bias,
                 dtype=self.dtype, name="conv")(x)
        return BatchNorm(train, eps=self.bn_eps, momentum=self.bn_momentum, dtype=self.dtype,
                         act=self.act, name="bn")(x)


class MultiHeadSelfAttention(nn.Module):
    """Flax's ``MultiHeadDotProductAttention`` as a ViT applies it: self-attention over the
    tokens (batch, tokens, width), no mask, ``num_heads`` heads of ``width // num_heads``,
    ``dropout_rate`` on the attention weights while training. Same variables: ``query``,
    ``key``, ``value`` with kernel (width, heads, head_dim) and bias (heads, head_dim), ``out``
    with kernel (heads, head_dim, width) and bias (width,); kernels initialised by
    ``kernel_init`` as (fan-in, fan-out) matrices, as Flax's ``DenseGeneral`` does, biases zero.

    q, k and v come from one product, their kernels side by side, which ``cpu.self_attention``
    reads in place, adding the biases.

    With ``class_token_only``, the first token (the class token) alone queries, every token
    still a key and a value: the output is that token's, (batch, 1, width), and the others'
    queries are never computed."""

    num_heads: int
    dropout_rate: float = 0.0
    class_token_only: bool = False
    kernel_init: Initializer = dense_init
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        batch, width = x.shape[0], x.shape[-1]
        heads = (self.num_heads, width // self.num_heads)
        query, key, value = (self._projection(name, (width,), heads)
                             for name in ("query", "key", "value"))
        out = self._projection("out", heads, (width,))
        dropout = train and self.dropout_rate > 0.0
        if self.class_token_only:
            q = _affine(x[:, :1], *query, self.dtype).reshape(batch, 1, *heads)
            products, biases = _side_by_side(x, (key, value), heads, self.dtype)
            y = self._attend(q, *_unstack(products + biases), dropout)
        else:
            products, biases = _side_by_side(x, (query, key, value), heads, self.dtype)
            if dropout:
                y = self._attend(*_unstack(products + biases), dropout)
            else:
                y = cpu.self_attention(products, biases)
        return _affine(y.reshape(batch, -1, width), *out, self.dtype)

    def _projection(self, name: str, in_shape, out_shape):
        return _DenseGeneralVariables(in_shape, out_shape, self.kernel_init, name=name)()

    def _attend(self, query, key, value, dropout: bool):
        return nn.dot_product_attention(
            query, key, value, dropout_rng=self.make_rng("dropout") if dropout else None,
            dropout_rate=self.dropout_rate, broadcast_dropout=False, deterministic=not dropout,
            dtype=self.dtype)


class _DenseGeneralVariables(nn.Module):
    """The ``kernel`` (in_shape + out_shape) and ``bias`` (out_shape) of a Flax
    ``DenseGeneral``, initialised alike, returned as a (fan-in, fan-out) matrix and a vector:
    ``MultiHeadSelfAttention`` applies q's, k's and v's side by side in one product."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_init: Initializer

    @nn.compact
    def __call__(self):
        matrix = (math.prod(self.in_shape), math.prod(self.out_shape))
        kernel_init = lambda rng, shape: self.kernel_init(rng, matrix, jnp.float32).reshape(shape)
        kernel = self.param("kernel", kernel_init, self.in_shape + self.out_shape)
        bias = self.param("bias", nn.initializers.zeros, self.out_shape, jnp.float32)
        return kernel.reshape(matrix), bias.reshape(-1)


def _affine(x, kernel, bias, dtype):
    return _product(x, kernel, dtype) + bias.astype(dtype)


def _side_by_side(x, projections, heads: tuple[int, int], dtype):
    """x's products with the projections' kernels, as one product: (..., n, heads, head_dim)
    for n projections; and their biases, (n, heads, head_dim)."""
    kernels, biases = zip(*projections)
    products = _product(x, jnp.concatenate(kernels, axis=1), dtype)
    n = len(projections)
    return (products.reshape(*x.shape[:-1], n, *heads),
            jnp.stack(biases).reshape(n, *heads).astype(dtype))


def _unstack(projected):
    """The (..., heads, head_dim) arrays of (..., n, heads, head_dim) ``projected``."""
    return tuple(projected[..., i, :, :] for i in range(projected.shape[-3]))


def max_pool(x, window: int, stride: int, padding: int | str = 0, ceil_mode: bool = False):
    """PyTorch's ``MaxPool2d`` (padding with -inf, optional ``ceil_mode``), or with
    ``padding="same"`` TensorFlow's SAME max-pool."""
    if padding == "same":
        return cpu.max_pool(x, (window, window), (stride, stride), "SAME")
    pads = [_pool_padding(size, window, stride, padding, ceil_mode) for size in x.shape[1:3]]
    return cpu.max_pool(x, (window, window), (stride, stride), pads)


def avg_pool(x, window: int, stride: int, padding: int = 0, ceil_mode: bool = False,
             count_include_pad: bool = True):
    """PyTorch's ``AvgPool2d``. With ``ceil_mode`` the extra right/bottom cells never count.
    Unpadded windows that tile the image (window = stride, dividing it) are sums of strided
    views (``_tiled_mean``), which XLA:CPU computes 3× faster than its ``reduce_window``."""
    if window == stride and not padding and x.shape[1] % window == x.shape[2] % window == 0:
        return _tiled_mean(x, window)
    if not ceil_mode:
        return nn.avg_pool(x, (window, window), (stride, stride),
                           padding=((padding, padding),) * 2, count_include_pad=count_include_pad)
    pads = [_pool_padding(size, window, stride, padding, ceil_mode) for size in x.shape[1:3]]
    summed = nn.pool(x, 0.0, jax.lax.add, (window, window), (stride, stride), pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    if count_include_pad:  # PyTorch counts the symmetric padding but not the ceil_mode overhang.
        ones = jnp.pad(ones, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                       constant_values=1)
        extra = [(0, p[1] - padding) for p in pads]
        counts = nn.pool(ones, 0.0, jax.lax.add, (window, window), (stride, stride),
                         [(0, extra[0][1]), (0, extra[1][1])])
    else:
        counts = nn.pool(ones, 0.0, jax.lax.add, (window, window), (stride, stride), pads)
    return summed / counts


def _tiled_mean(x, window: int):
    """The mean of each ``window``² tile of NHWC ``x``: rows summed as whole rows of the
    image, then neighbouring pixels as blocks of channels, each a sum of contiguous slices."""
    n, height, width, channels = x.shape
    rows = x.reshape(n, height // window, window, width * channels)
    rows = sum((rows[:, :, k] for k in range(1, window)), rows[:, :, 0])
    pixels = rows.reshape(n, height // window, width // window, window, channels)
    total = sum((pixels[:, :, :, k] for k in range(1, window)), pixels[:, :, :, 0])
    return total * (1.0 / window ** 2)


def _pool_padding(size: int, window: int, stride: int, padding: int, ceil_mode: bool):
    if not ceil_mode:
        return (padding, padding)
    out = math.ceil((size + 2 * padding - window) / stride) + 1
    if (out - 1) * stride >= size + padding:  # PyTorch: the last window must start inside.
        out -= 1
    return (padding, (out - 1) * stride + window - size - padding)


def adaptive_avg_pool(x, output_size: int | Sequence[int]):
    """PyTorch's ``AdaptiveAvgPool2d``: bin i spans [floor(i*H/o), ceil((i+1)*H/o))."""
    oh, ow = pair(output_size)
    h, w = x.shape[1:3]
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:
        return nn.avg_pool(x, (h // oh, w // ow), (h // oh, w // ow))
    rows = [x[:, (i * h) // oh:-(-((i + 1) * h) // oh)].mean(axis=1, keepdims=True)
            for i in range(oh)]
    x = jnp.concatenate(rows, axis=1)
    cols = [x[:, :, (j * w) // ow:-(-((j + 1) * w) // ow)].mean(axis=2, keepdims=True)
            for j in range(ow)]
    return jnp.concatenate(cols, axis=2)


def global_avg_pool(x):
    return jnp.mean(x, axis=(1, 2))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor``, never below 90% of ``value`` (MobileNet)."""
    min_value = min_value or divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool → reduce conv → act → expand conv → gate."""

    squeeze_channels: int
    act: Activation = nn.relu
    gate: Activation = jax.nn.sigmoid
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.Conv(self.squeeze_channels, (1, 1), dtype=self.dtype, name="reduce")(s)
        s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="expand")(self.act(s))
        return x * self.gate(s)


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per example with probability ``rate`` while training
    and rescales the kept ones (torchvision's ``StochasticDepth(mode="row")``)."""

    rate: float

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, 0.0)


def residual_sum(x, y):
    """``x + y``, a residual block's output, written to memory once for all of its consumers
    (``cpu.materialize``)."""
    return cpu.materialize(x + y)


def residual_relu(x, y):
    """``relu(x + y)``, a residual block's output, written once, its gradient masked by the
    output (``cpu.residual_relu``)."""
    return cpu.residual_relu(x + y)


def add_position_embedding(tokens, embedding):
    """``tokens + embedding``: the (1, tokens, width) embedding added to each image's
    (batch, tokens, width) tokens (``cpu.add_to_each_image``)."""
    return cpu.add_to_each_image(tokens, embedding.astype(tokens.dtype))
