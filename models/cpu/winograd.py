"""3×3 stride-1 convolutions as Winograd's F(4×4, 3×3) algorithm (Lavin & Gray, 2015), all
three passes, for CPUs where oneDNN has no Winograd kernels of its own (no AVX-512).

Each 4×4 output tile comes from a 6×6 input tile: the tiles' transforms Bᵀ·d·B and Aᵀ·m·A
are this project's kernels (``csrc/winograd.cc``), and between them are 36 matrix products
over all tiles of the batch (oneDNN's matmul):

- forward: y = Aᵀ·[(G·w·Gᵀ) · (Bᵀ·x·B)]·A, the product contracting the input channels;
- input gradient: the forward pass of the output gradient with the kernel turned 180° and its
  channel axes swapped;
- kernel gradient: w̄ = Gᵀ·[(Bᵀ·x·B)ᵀ · (A·ȳ·Aᵀ)]·G, the product contracting the tiles.

``conv`` equals ``lax.conv_general_dilated`` to 1e-5 of the largest output (and gradient);
``models.cpu.dispatch`` sends it convolutions on the CPU, float32, with the native library
loaded; ``TRANSFERLAB_WINOGRAD=0`` keeps them direct. A mesh shards the batch.
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


def takes(pads: Pads) -> bool:
    """Whether ``conv`` takes these pads: at most 2 on each side."""
    return all(0 <= p <= 2 for side in pads for p in side)


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
    """(36, I, O): ``matrix`` (36, 9) times the (3, 3, I, O) kernel's taps, as one product."""
    return jnp.dot(matrix, w.reshape(9, -1)).reshape(ALPHA * ALPHA, *w.shape[2:])


def _kernel_gradient(du):
    """(3, 3, I, O): Gᵀ·du·G of the (36, I, O) transformed kernel's gradient."""
    return jnp.dot(_KERNEL.T, du.reshape(ALPHA * ALPHA, -1)).reshape(3, 3, *du.shape[1:])


def _convolve_local(x, u, out_shape, params: tuple[Pads, bool]):
    """The convolution of ``x`` whose kernel's transform is ``u`` (36, I, O), or with
    ``transpose_u`` (36, O, I) read transposed."""
    pads, transpose_u = params
    tiles = _tiles(out_shape[1:3])
    v = _input_transform(x, tiles, pads[0][0], pads[1][0])
    return _output_transform(native.matmuls(v, u, transpose_b=transpose_u), out_shape, tiles)


def _kernel_gradient_local(x, dy, u_shape, pads: Pads):
    """The gradient of the kernel's transform: (36, I, O)."""
    tiles = _tiles(dy.shape[1:3])
    v = _input_transform(x, tiles, pads[0][0], pads[1][0])
    return native.matmuls(v, _gradient_transform(dy, tiles), transpose_a=True)


_forward = native.per_image(_convolve_local, "b h w c, k c o -> b i j o", statics=2)
_backward_data = native.per_image(_convolve_local, "b i j o, k c o -> b h w c", statics=2)
_transform_gradient = native.per_image(_kernel_gradient_local, "b h w c, b i j o -> k c o",
                                       statics=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x, w, pads: Pads):
    """``lax.conv_general_dilated`` of float32 NHWC ``x`` with a (3, 3, I, O) kernel ``w``,
    stride 1, ``pads`` ((top, bottom), (left, right)) each at most 2 (``takes``): values and
    gradients within 1e-5 of the largest of XLA's."""
    out_shape = native.output_shape(x.shape, (3, 3), (1, 1), pads, w.shape[3])
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
