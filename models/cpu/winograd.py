"""3×3 stride-1 convolutions as Winograd's F(4×4, 3×3) algorithm (Lavin & Gray, 2015), all
three passes, on CPUs where oneDNN has no Winograd kernels of its own.

oneDNN 2.6's Winograd kernels need AVX-512; without it (AVX2 CPUs such as AMD's Zen 1–3) a 3×3
convolution runs oneDNN's direct kernel, at the machine's peak of multiply-adds already (a
ResNet-18 stage-1 convolution's forward pass: 3.7 GFLOP in 80 ms on a 2-core Zen 1, whose
1024³ product runs at 43 GFLOP/s). F(4×4, 3×3) computes each 4×4 output tile from a 6×6 input
tile with 36 multiplies per channel pair instead of 144: the input tiles' transform Bᵀ·d·B and
the output tiles' Aᵀ·m·A are this project's kernels (``csrc/winograd.cc``), and between them
are 36 matrix products over all tiles of the batch (oneDNN's matmul):

- forward: y = Aᵀ·[(G·w·Gᵀ) · (Bᵀ·x·B)]·A, the product contracting the input channels;
- input gradient: the forward pass of the output gradient with the kernel turned 180° and its
  channel axes swapped;
- kernel gradient: w̄ = Gᵀ·[(Bᵀ·x·B)ᵀ · (A·ȳ·Aᵀ)]·G, the product contracting the tiles.

Values are those of ``lax.conv_general_dilated`` to about 1e-5 of the largest output (the
transforms' sums of up to 36 terms in float32; oneDNN's own F(4×4, 3×3) kernels on AVX-512
differ from direct convolution by about as much). ``TRANSFERLAB_ONEDNN_WINOGRAD=0`` keeps
direct convolution here too. A mesh shards the batch: each device transforms and multiplies
its own images' tiles, and the kernel gradient is summed over the devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.cpu import native

TILE, ALPHA = 4, 6  # output tile, input tile (TILE + 3 − 1)
# The kernel's transform (ALPHA × 3); the tiles' Bᵀ and Aᵀ are in csrc/winograd.cc.
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
Pads = tuple[tuple[int, int], tuple[int, int]]

# oneDNN's jit_wino_4x3 and jit_wino_2x3 kernels are built for avx512_core.
_ONEDNN_WINOGRAD_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def onednn_has_winograd() -> bool:
    """Whether oneDNN runs Winograd kernels of its own on this CPU (AVX-512)."""
    return _ONEDNN_WINOGRAD_FLAGS <= set(native.cpu_info().get("flags", "").split())


def suits(kernel_shape, strides, pads: Pads, groups: int) -> bool:
    """Whether a convolution runs here rather than on oneDNN: one that oneDNN would run as
    Winograd (``native.winograd_suits``: 3×3, stride 1, ungrouped) padded by at most 2 on each
    side, on a CPU where oneDNN has no Winograd kernels."""
    return (native.winograd_suits(kernel_shape, strides, groups)
            and all(0 <= p <= 2 for side in pads for p in side) and not onednn_has_winograd())


def _tiles(out_hw) -> tuple[int, int]:
    return tuple(-(-size // TILE) for size in out_hw)


def _transformed_shape(n: int, tiles: tuple[int, int], channels: int):
    return jax.ShapeDtypeStruct((ALPHA * ALPHA, n * tiles[0] * tiles[1], channels), jnp.float32)


def _input_transform(x, tiles, pad_top: int, pad_left: int):
    """(36, tiles, C): Bᵀ·d·B of each 6×6 tile d of ``x``, read from (4i − pad_top,
    4j − pad_left), zeros outside ``x``."""
    return jax.ffi.ffi_call("transferlab_onednn_winograd_input",
                            _transformed_shape(x.shape[0], tiles, x.shape[3]),
                            vmap_method="sequential")(
        x, tiles_h=np.int64(tiles[0]), tiles_w=np.int64(tiles[1]), pad_top=np.int64(pad_top),
        pad_left=np.int64(pad_left))


def _output_transform(m, out_shape, tiles):
    return jax.ffi.ffi_call("transferlab_onednn_winograd_output",
                            jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32),
                            vmap_method="sequential")(
        m, tiles_h=np.int64(tiles[0]), tiles_w=np.int64(tiles[1]))


def _gradient_transform(dy, tiles):
    return jax.ffi.ffi_call("transferlab_onednn_winograd_grad",
                            _transformed_shape(dy.shape[0], tiles, dy.shape[3]),
                            vmap_method="sequential")(
        dy, tiles_h=np.int64(tiles[0]), tiles_w=np.int64(tiles[1]))


# G·w·Gᵀ for each of the 36 transformed taps, as a (36, 9) matrix over the kernel's 9 taps, and
# the same of the kernel turned 180° (its taps in reverse order).
_KERNEL = np.einsum("ai,bj->abij", G, G).reshape(ALPHA * ALPHA, 9).astype(np.float32)
_TURNED = _KERNEL[:, ::-1]


def _kernel_transform(w, matrix):
    """(36, I, O): ``matrix`` (36, 9) times the (3, 3, I, O) kernel's taps, one product (XLA's
    is faster here than 36 sums of taps, 12 against 27 ms for 512 channels each way)."""
    return jnp.dot(matrix, w.reshape(9, -1)).reshape(ALPHA * ALPHA, *w.shape[2:])


def _kernel_gradient(du):
    """(3, 3, I, O): Gᵀ·du·G of the (36, I, O) transformed kernel's gradient."""
    return jnp.dot(_KERNEL.T, du.reshape(ALPHA * ALPHA, -1)).reshape(3, 3, *du.shape[1:])


def _products(a, b, transpose_a: bool = False, transpose_b: bool = False):
    """The 36 matrix products a[k]·b[k], either read transposed in place, on oneDNN's
    matmul."""
    view = lambda transposed: native._COLUMNS if transposed else native._ROWS
    return native._matmul_call(a[None], b[None], view(transpose_a), view(transpose_b),
                               native._ROWS)[0]


def _convolve_local(x, u, out_shape, params: tuple[Pads, bool]):
    """The convolution of ``x`` whose kernel's transform is ``u`` (36, I, O), or with
    ``transpose_u`` (36, O, I) read transposed."""
    pads, transpose_u = params
    tiles = _tiles(out_shape[1:3])
    v = _input_transform(x, tiles, pads[0][0], pads[1][0])
    return _output_transform(_products(v, u, transpose_b=transpose_u), out_shape, tiles)


def _kernel_gradient_local(x, dy, u_shape, pads: Pads):
    """The gradient of the kernel's transform: (36, I, O)."""
    tiles = _tiles(dy.shape[1:3])
    v = _input_transform(x, tiles, pads[0][0], pads[1][0])
    return _products(v, _gradient_transform(dy, tiles), transpose_a=True)


_forward = native._batch_parallel("b h w c, k c o -> b i j o", _convolve_local, True)
_backward_data = native._batch_parallel("b i j o, k c o -> b h w c", _convolve_local, True)
_transform_gradient = native._batch_parallel("b h w c, b i j o -> k c o",
                                             _kernel_gradient_local, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x, w, pads: Pads):
    """Stride-1 convolution of float32 NHWC ``x`` with a (3, 3, I, O) kernel ``w``, ``pads``
    ((top, bottom), (left, right)) each at most 2: ``lax.conv_general_dilated``'s values."""
    out_shape = native._output_shape(x.shape, (3, 3), (1, 1), pads, w.shape[3])
    return _forward(x, _kernel_transform(w, _KERNEL), out_shape, (pads, False))


def _conv_fwd(x, w, pads):
    return conv(x, w, pads), (x, w)


def _conv_bwd(pads, residuals, dy):
    """The input gradient is the forward pass of ``dy`` with the kernel turned 180° and its
    channel axes swapped (the products read its transform transposed), padded to give ``x``'s
    shape."""
    x, w = residuals
    turned_pads = tuple((2 - lo, 2 - hi) for lo, hi in pads)
    dx = _backward_data(dy, _kernel_transform(w, _TURNED), x.shape, (turned_pads, True))
    du = _transform_gradient(x, dy, (ALPHA * ALPHA, *w.shape[2:]), pads)
    return dx, _kernel_gradient(du)


conv.defvjp(_conv_fwd, _conv_bwd)
