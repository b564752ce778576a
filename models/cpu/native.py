"""The native library: this project's kernels (``csrc/``), oneDNN's and MKL's, as XLA FFI calls
on the CPU, for float32 operands.

Each function computes the operation its docstring names, equal to that of JAX or Flax to the
tolerance it states (checked by tests/cpu/test_native.py); ``models.cpu.dispatch`` decides where
each applies. The library is built on first use with g++ against Debian's ``libdnnl-dev``
(``make setup`` installs it) and jaxlib's FFI headers, with MKL's sgemm where the ``mkl`` wheel
is installed, and cached in ``~/.cache/transferlab``. ``available()`` says whether it loaded
(``unavailable_reason()`` why not); ``enabled()`` whether calls traced now go to it, which
``TRANSFERLAB_NATIVE=0`` (``models.cpu.switches``) and ``disabled()`` turn off. Under ``jit``
over a mesh each device computes its own images (``per_image``). GNU OpenMP, which the library
loads, starts with ``OPENMP_DEFAULTS`` unless the environment (or an OpenMP loaded before) sets
them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from models.cpu import build, switches

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("onednn.cc", "attention.cc", "depthwise_conv.cc",
                                         "batch_norm.cc", "layer_norm.cc", "gelu.cc",
                                         "max_pool.cc", "materialize.cc", "winograd.cc"))
MKL_SOURCE = CSRC / "sgemm.cc"  # built where the mkl wheel is installed (``mkl_runtime``)
HEADER = Path("/usr/include/oneapi/dnnl/dnnl.hpp")
TARGETS = {"forward": "OnednnConvForward", "backward_data": "OnednnConvBackwardData",
           "backward_weights": "OnednnConvBackwardWeights",
           "depthwise_backward_weights": "DepthwiseBackwardWeights",
           "matmul": "OnednnMatmul", "batch_norm_sums": "BatchNormSums",
           "batch_norm_grad_sums": "BatchNormGradSums",
           "batch_norm_activation_grad_sums": "BatchNormActivationGradSums",
           "max_pool_forward": "MaxPoolForward", "max_pool_backward": "MaxPoolBackward",
           "attention_forward": "AttentionForward", "attention_backward": "AttentionBackward",
           "layer_norm_forward": "LayerNormForward", "layer_norm_backward": "LayerNormBackward",
           "gelu_backward": "GeluBackward",
           "materialize": "Materialize", "winograd_input": "WinogradInput",
           "winograd_output": "WinogradOutput", "winograd_grad": "WinogradGrad"}
# GNU OpenMP reads its settings once, as it loads. Its workers spin after each call by default,
# holding cores on which XLA runs the element-wise work between two calls; passive, they sleep.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
# -fno-trapping-math: no code here reads floating-point exceptions, and without it GCC leaves
# scalar any loop that clamps a float before converting it to an integer (``Exp`` in
# csrc/vector_math.h) on CPUs without AVX-512's masks.
COMPILER_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-fopenmp", "-ffp-contract=fast",
                  "-fno-trapping-math")
Pads = tuple[tuple[int, int], tuple[int, int]]

_disabled_while_tracing = [False]


def enabled() -> bool:
    """Whether operations traced now go to the native library: it loaded, the default backend is
    the CPU, ``TRANSFERLAB_NATIVE`` is not 0 and no ``disabled()`` block is open."""
    return (not _disabled_while_tracing[0] and switches.on("TRANSFERLAB_NATIVE")
            and jax.default_backend() == "cpu" and available())


def available() -> bool:
    """Whether the library built (on the first call) and loaded."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why the library did not load (the build's or the loader's error), or None."""
    return None if available() else _library.reason


@contextlib.contextmanager
def disabled():
    """Operations traced inside keep XLA's own lowering, e.g. for ``cost_analysis``, which
    counts no flops in a foreign call. A function ``jit`` traced before keeps its trace."""
    before, _disabled_while_tracing[0] = _disabled_while_tracing[0], True
    try:
        yield
    finally:
        _disabled_while_tracing[0] = before


def implementations() -> list[tuple[str, str]]:
    """``(pass, oneDNN kernel)`` of each primitive built so far in this process, e.g.
    ``("forward", "jit_wino_4x3:avx512_core")`` or ``("matmul", "brg:avx512_core")``."""
    library = _library()
    if library is None:
        return []
    library.OnednnConvImplementations.restype = ctypes.c_size_t
    size = library.OnednnConvImplementations(None, 0) + 1
    text = ctypes.create_string_buffer(size)
    library.OnednnConvImplementations(text, size)
    return [tuple(line.split(" ", 1)) for line in text.value.decode().splitlines()]


def mkl_runtime() -> Path | None:
    """MKL's single dynamic library (``libmkl_rt``) from the ``mkl`` wheel, if installed."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f.locate() for f in files if f.name.startswith("libmkl_rt.so")]
    return Path(os.path.normpath(found[0])) if found else None


def library_path() -> Path:
    """Where the built library is cached: one file per version of ``csrc``, of jaxlib, of MKL's
    presence and of the compiler's flags."""
    return build.cached_library(
        "onednn", *(f.read_bytes() for f in sorted(CSRC.glob("*.[ch]*"))),
        jax.__version__.encode(), str(mkl_runtime()).encode(), " ".join(COMPILER_FLAGS).encode())


def build_library() -> Path:
    """Compile ``csrc/*.cc`` into one library (once: the result is cached by content), with
    ``sgemm.cc`` linked to MKL where ``mkl_runtime`` finds it."""
    if not HEADER.exists():
        raise OSError(f"oneDNN's headers are missing ({HEADER}): install Debian's libdnnl-dev "
                      "(`apt-get install libdnnl-dev`) or run `make setup` as root.")
    sources, libraries, mkl = SOURCES, ["-ldnnl"], mkl_runtime()
    if mkl:
        sources += (MKL_SOURCE,)
        libraries += [f"-L{mkl.parent}", f"-l:{mkl.name}", f"-Wl,-rpath,{mkl.parent}"]
    command = ["g++", *COMPILER_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, sources)]
    return build.compile_once(library_path(), command, libraries,
                              ", ".join(s.name for s in sources))


@contextlib.contextmanager
def _openmp_defaults():
    """``OPENMP_DEFAULTS`` in the environment where it does not say otherwise, for as long as
    OpenMP takes to load and read them (subprocesses started later do not inherit them)."""
    added = {k: v for k, v in OPENMP_DEFAULTS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            del os.environ[key]


@functools.cache
def _library():
    try:
        path = build_library()
        with _openmp_defaults():
            library = ctypes.CDLL(str(path))
    except OSError as e:
        _library.reason = str(e)
        logging.warning("The native CPU kernels are unavailable; XLA's own run: %s", e)
        return None
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(f"transferlab_onednn_{name}",
                                    jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    if has_mkl(library):
        jax.ffi.register_ffi_target("transferlab_mkl_sgemm",
                                    jax.ffi.pycapsule(library.MklSgemm), platform="cpu")
    return library


def has_mkl(library=None) -> bool:
    """Whether the library was built with MKL's sgemm (``dense`` runs on it where
    ``uses_mkl``)."""
    library = library or _library()
    return library is not None and hasattr(library, "MklSgemm")


def uses_mkl() -> bool:
    """Whether matrix products (``dense``) run on MKL's sgemm rather than oneDNN's matmul: where
    the library has it (``has_mkl``) and ``TRANSFERLAB_MKL`` is 1, or unset on an Intel CPU;
    read while tracing."""
    choice = switches.value("TRANSFERLAB_MKL")
    wanted = choice == "1" if choice else cpu_info().get("vendor_id") == "GenuineIntel"
    return wanted and has_mkl()


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (``vendor_id``, ``model name``,
    ``cpu family``, ``model``, …); empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


# oneDNN's jit_wino_4x3 and jit_wino_2x3 kernels are built for avx512_core.
_ONEDNN_WINOGRAD_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def onednn_has_winograd() -> bool:
    """Whether oneDNN has Winograd kernels of its own for this CPU (AVX-512)."""
    return _ONEDNN_WINOGRAD_FLAGS <= set(cpu_info().get("flags", "").split())


def output_shape(x_shape, window, strides, pads: Pads, channels: int):
    """The NHWC shape of a convolution's or a pooling's output over ``window``."""
    hw = [(size + lo + hi - k) // s + 1
          for size, (lo, hi), k, s in zip(x_shape[1:3], pads, window, strides)]
    return (x_shape[0], *hw, channels)


def _batch_axis(shape_with_sharding):
    spec = getattr(shape_with_sharding.sharding, "spec", None)
    return spec[0] if spec else None


def _non_batch_factors(rule: str) -> tuple[str, ...]:
    factors = dict.fromkeys(rule.replace(",", " ").replace("->", " ").split())
    return tuple(f for f in factors if f != "b")


def _one_or_tuple(items: tuple):
    return items[0] if len(items) == 1 else items


def per_image(local, rule: str, statics: int = 0):
    """``local(*operands, *static)`` partitioned over the batch (first) axis: each device
    computes its own images. ``rule`` names each operand's and result's axes, ``b`` the batch:
    operands without it are replicated; a result with it is split like the first operand, one
    without it (a sum over the images) is summed over the devices. The last ``statics``
    arguments are static, the first of them the result's shape, which each device gets for its
    own images."""
    operand_specs, result_specs = ([spec.split() for spec in side.split(",")]
                                   for side in rule.split("->"))
    summed = tuple(spec[0] != "b" for spec in result_specs)
    first_static = len(operand_specs)

    @functools.partial(custom_partitioning,
                       static_argnums=tuple(range(first_static, first_static + statics)))
    def fn(*args):
        return local(*args)

    def result_shardings(mesh, arg_shapes):
        batch = NamedSharding(mesh, P(_batch_axis(arg_shapes[0])))
        return _one_or_tuple(tuple(NamedSharding(mesh, P()) if s else batch for s in summed))

    def partition(*args):
        static, (mesh, arg_shapes, _) = args[:statics], args[statics:]
        batch = _batch_axis(arg_shapes[0])
        operands = tuple(NamedSharding(mesh, P(batch) if spec[0] == "b" else P())
                         for spec in operand_specs)

        def lower(*operands):
            own = static
            if statics and not summed[0]:  # the result's shape over this device's images
                own = ((operands[0].shape[0], *static[0][1:]), *static[1:])
            results = local(*operands, *own)
            if batch is None or not any(summed):
                return results
            results = results if len(summed) > 1 else (results,)
            return _one_or_tuple(tuple(jax.lax.psum(r, batch) if s else r
                                       for r, s in zip(results, summed)))
        return mesh, lower, result_shardings(mesh, arg_shapes), operands

    fn.def_partition(
        infer_sharding_from_operands=lambda *args: result_shardings(*args[statics:statics + 2]),
        partition=partition, sharding_rule=rule,
        reduction_factors=("b",) if any(summed) else (),
        need_replication_factors=_non_batch_factors(rule))
    return fn


Geometry = tuple[tuple[int, int], Pads, int, bool]  # strides, pads, groups, winograd


def _conv_call(name: str, a, b, out_shape, geometry: Geometry):
    strides, ((top, bottom), (left, right)), groups, winograd = geometry
    out = jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32)
    return jax.ffi.ffi_call(f"transferlab_onednn_{name}", out, vmap_method="sequential")(
        a, b, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
        pad_right=np.int64(right), groups=np.int64(groups), winograd=np.int64(winograd))


def _conv_pass(name: str, rule: str):
    return per_image(functools.partial(_conv_call, name), rule, statics=2)


# The kernel's input channels (d) are those of one group: c / groups.
_forward = _conv_pass("forward", "b h w c, k l d o -> b i j o")
_backward_data = _conv_pass("backward_data", "b i j o, k l d o -> b h w c")
_backward_weights = _conv_pass("backward_weights", "b h w c, b i j o -> k l d o")
_depthwise_backward_weights = _conv_pass("depthwise_backward_weights",
                                         "b h w c, b i j o -> k l d o")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv(x, w, strides: tuple[int, int], pads: Pads, groups: int = 1, winograd: bool = False):
    """``lax.conv_general_dilated`` of float32 NHWC ``x`` with an HWIO kernel ``w`` (no
    dilation), ``pads`` explicit ((top, bottom), (left, right)), ``groups`` its
    ``feature_group_count``, on oneDNN's kernels in all three passes: direct ones, or with
    ``winograd`` (for 3×3, stride 1, ungrouped) its Winograd F(4×4, 3×3) where it has them for
    the CPU (``onednn_has_winograd``). Values and gradients within 1e-4 of XLA's for operands
    of unit scale; Winograd's within 1e-5 of the largest. The kernel gradient of a depthwise
    convolution whose window is not 3×3 is this project's (``csrc/depthwise_conv.cc``)."""
    out_shape = output_shape(x.shape, w.shape[:2], strides, pads, w.shape[3])
    return _forward(x, w, out_shape, (strides, pads, groups, winograd))


def _conv_forward(x, w, strides, pads, groups, winograd):
    return conv(x, w, strides, pads, groups, winograd), (x, w)


def _conv_backward(strides, pads, groups, winograd, residuals, dy):
    x, w = residuals
    # oneDNN's depthwise kernel gradient takes 3×3 windows only, others its grouped kernel's
    own = groups == x.shape[-1] == w.shape[-1] and tuple(w.shape[:2]) != (3, 3)
    kernel_gradient = _depthwise_backward_weights if own else _backward_weights
    geometry = (strides, pads, groups, winograd)
    return (_backward_data(dy, w, x.shape, geometry),
            kernel_gradient(x, dy, w.shape, geometry))


conv.defvjp(_conv_forward, _conv_backward)


Axes = tuple[int, int, int, int]
_ROWS, _COLUMNS = (0, 1, 2, 3), (0, 1, 3, 2)  # a matrix's view: itself, or its transpose


def _view_shape(shape, axes: Axes):
    return tuple(shape[axis] for axis in axes)


def _matmul_call(a, b, a_axes: Axes, b_axes: Axes, out_axes: Axes):
    a_view, b_view = _view_shape(a.shape, a_axes), _view_shape(b.shape, b_axes)
    out_view = (*a_view[:3], b_view[3])
    out_shape = [0] * 4
    for size, axis in zip(out_view, out_axes):
        out_shape[axis] = size
    out = jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32)
    return jax.ffi.ffi_call("transferlab_onednn_matmul", out, vmap_method="sequential")(
        a, b, a_axes=np.array(a_axes, np.int64), b_axes=np.array(b_axes, np.int64),
        out_axes=np.array(out_axes, np.int64))


def matmuls(a, b, transpose_a: bool = False, transpose_b: bool = False):
    """The products a[k]·b[k] over the leading axis of float32 ``a`` and ``b`` (rank 3), either
    read transposed in place (``transpose_a``, ``transpose_b``), on oneDNN's matmul: those of
    ``jnp.matmul``, to float32 rounding."""
    view = lambda transposed: _COLUMNS if transposed else _ROWS
    return _matmul_call(a[None], b[None], view(transpose_a), view(transpose_b), _ROWS)[0]


def _matrix_product(a, b, out_shape, transposed: str):
    """``a`` and ``b`` taken as matrices (all axes but the last merged into rows) multiplied
    in one call, MKL's sgemm where ``uses_mkl``, else oneDNN's matmul: a·b, aᵀ·b
    (``transposed`` "a") or a·bᵀ ("b")."""
    if uses_mkl():
        return jax.ffi.ffi_call("transferlab_mkl_sgemm",
                                jax.ShapeDtypeStruct(out_shape, jnp.float32),
                                vmap_method="sequential")(
            a, b, transpose_a=transposed == "a", transpose_b=transposed == "b")
    out = _matmul_call(a.reshape(1, 1, -1, a.shape[-1]), b.reshape(1, 1, -1, b.shape[-1]),
                       _COLUMNS if transposed == "a" else _ROWS,
                       _COLUMNS if transposed == "b" else _ROWS, _ROWS)
    return out.reshape(out_shape)


_dense_forward = per_image(_matrix_product, "b r k, k n -> b r n", statics=2)
_dense_input_grad = per_image(_matrix_product, "b r n, k n -> b r k", statics=2)
_dense_kernel_grad = per_image(_matrix_product, "b r k, b r n -> k n", statics=2)


@jax.custom_vjp
def dense(x, w):
    """``x @ w`` of float32 ``x`` (batch, rows, k) and ``w`` (k, n), a Dense layer over tokens,
    as one matrix product (MKL's sgemm where ``uses_mkl``, else oneDNN's matmul), and its
    gradients likewise, reading ``w`` and ``x`` transposed in place: ``lax.dot_general``'s
    values to float32 rounding (within 1e-4 for operands of unit scale). Under a mesh the
    kernel gradient is summed over the devices."""
    return _dense_forward(x, w, (*x.shape[:2], w.shape[1]), "")


def _dense_fwd(x, w):
    return dense(x, w), (x, w)


def _dense_bwd(residuals, g):
    x, w = residuals
    return _dense_input_grad(g, w, x.shape, "b"), _dense_kernel_grad(x, g, w.shape, "a")


dense.defvjp(_dense_fwd, _dense_bwd)


# The activations ``batch_norm_grad_sums`` differentiates, by their codes in csrc/batch_norm.cc.
BATCH_NORM_ACTIVATIONS = {"relu": 1, "relu6": 2, "silu": 3, "hard_swish": 4}


def _sums_shape(x):
    return jax.ShapeDtypeStruct((x.shape[0], 2, x.shape[-1]), jnp.float32)


def _sums_call(x):
    return jax.ffi.ffi_call("transferlab_onednn_batch_norm_sums", _sums_shape(x),
                            vmap_method="sequential")(x)


_per_image_sums = per_image(_sums_call, "b h w c -> b t c")


def batch_norm_sums(x):
    """(N, 2, C): Σ x and Σ x² over each image's pixels of float32 NHWC ``x``, in one pass;
    numpy's sums to a relative 1e-5 (accumulated in double past 64 rows)."""
    return _per_image_sums(x)


def _grad_sums_call(x, dy, affine):
    return jax.ffi.ffi_call("transferlab_onednn_batch_norm_grad_sums", _sums_shape(x),
                            vmap_method="sequential")(x, dy, affine)


_per_image_grad_sums = per_image(_grad_sums_call, "b h w c, b h w c, r c -> b t c")


@functools.cache
def _per_image_activation_grad_sums(activation: str):
    code = np.int64(BATCH_NORM_ACTIVATIONS[activation])

    def local(x, y, dy, affine):
        shapes = (_sums_shape(x), jax.ShapeDtypeStruct(x.shape, jnp.float32))
        return jax.ffi.ffi_call("transferlab_onednn_batch_norm_activation_grad_sums", shapes,
                                vmap_method="sequential")(x, y, dy, affine, activation=code)
    return per_image(local, "b h w c, b h w c, b h w c, r c -> b t c, b h w c")


def batch_norm_grad_sums(x, y, dy, a, b, mean, activation: str | None = None):
    """((N, 2, C), g): Σ g and Σ g·(x − mean) over each image's pixels of float32 NHWC ``x``
    and ``dy``, and g = dy · act'(a·x + b) for the named ``activation`` (None: g = dy), where
    y = act(a·x + b) is the forward pass's output (unused without an activation), in one pass;
    SiLU's derivative comes from y, within 2e-6 (relative) of float64's σ + pre·σ·(1 − σ)."""
    affine = jnp.stack([a, b, mean])
    if activation is None:
        return _per_image_grad_sums(x, dy, affine), dy
    return _per_image_activation_grad_sums(activation)(x, y, dy, affine)


def _pool_attributes(window: tuple[int, int], strides: tuple[int, int], pads: Pads) -> dict:
    (top, _), (left, _) = pads
    return dict(window_h=np.int64(window[0]), window_w=np.int64(window[1]),
                stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                pad_top=np.int64(top), pad_left=np.int64(left))


@functools.cache
def _per_image_max_pool(window: tuple[int, int], strides: tuple[int, int], pads: Pads):
    def local(x):
        out = jax.ShapeDtypeStruct(output_shape(x.shape, window, strides, pads, x.shape[3]),
                                   jnp.float32)
        return jax.ffi.ffi_call("transferlab_onednn_max_pool_forward", out,
                                vmap_method="sequential")(
            x, **_pool_attributes(window, strides, pads))
    return per_image(local, "b h w c -> b i j c")


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], pads: Pads):
    """Max pooling of float32 NHWC ``x`` over ``window`` at ``strides``, padded ((top, bottom),
    (left, right)) with -inf: ``lax.reduce_window``'s max, exactly (NaN wins)."""
    return _per_image_max_pool(tuple(window), tuple(strides), tuple(pads))(x)


@functools.cache
def _per_image_max_pool_backward(window: tuple[int, int], strides: tuple[int, int],
                                 pads: Pads):
    def local(x, y, dy):
        return jax.ffi.ffi_call("transferlab_onednn_max_pool_backward",
                                jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                vmap_method="sequential")(
            x, y, dy, **_pool_attributes(window, strides, pads))
    return per_image(local, "b h w c, b i j c, b i j c -> b h w c")


def max_pool_backward(x, y, dy, window: tuple[int, int], strides: tuple[int, int], pads: Pads):
    """The gradient of max pooling float32 NHWC ``x`` (``y`` the pooled result, ``dy`` its
    gradient) over ``window`` at ``strides``, padded ((top, bottom), (left, right)) with -inf:
    each output's gradient goes to the first tap (row-major) that holds its maximum, as
    PyTorch's ``MaxPool2d``; without ties, the gradient of ``lax.reduce_window``'s max to 1e-6
    (overlapping windows add in turn)."""
    return _per_image_max_pool_backward(tuple(window), tuple(strides), tuple(pads))(x, y, dy)


def _attention_forward_call(qkv, bias):
    batch, tokens, _, heads, depth = qkv.shape
    results = (jax.ShapeDtypeStruct((batch, tokens, heads, depth), jnp.float32),
               jax.ShapeDtypeStruct((batch, heads, tokens, tokens), jnp.float32))
    return jax.ffi.ffi_call("transferlab_onednn_attention_forward", results,
                            vmap_method="sequential")(qkv, bias)


def _attention_backward_call(qkv, bias, probabilities, dout):
    results = (jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
               jax.ShapeDtypeStruct((qkv.shape[0], *bias.shape), jnp.float32))
    return jax.ffi.ffi_call("transferlab_onednn_attention_backward", results,
                            vmap_method="sequential")(qkv, bias, probabilities, dout)


_attention_forward = per_image(_attention_forward_call, "b t i h d, i h d -> b t h d, b h t s")
_attention_backward = per_image(_attention_backward_call,
                                "b t i h d, i h d, b h t s, b t h d -> b t i h d, b i h d")


@jax.custom_vjp
def self_attention(qkv, bias):
    """``jax.nn.dot_product_attention`` (no mask) of q, k, v = ``qkv[:, :, i] + bias[i]``,
    float32 ``qkv`` (batch, tokens, 3, heads, depth) as one Dense layer with the three kernels
    side by side writes it, read in place, ``bias`` (3, heads, depth): values within 1e-5 and
    gradients within 5e-5 for operands of unit scale. One task per image and head
    (``csrc/attention.cc``); each head's probabilities are kept for the gradient, which
    recomputes neither the logits nor their exponentials."""
    return _attention_forward(qkv, bias)[0]


def _self_attention_fwd(qkv, bias):
    out, probabilities = _attention_forward(qkv, bias)
    return out, (qkv, bias, probabilities)


def _self_attention_bwd(residuals, dout):
    dqkv, sums = _attention_backward(*residuals, dout)
    return dqkv, sums.sum(0)


self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)


@functools.cache
def _per_image_layer_norm(epsilon: float):
    def forward(x, scale, bias):
        return jax.ffi.ffi_call("transferlab_onednn_layer_norm_forward",
                                jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                vmap_method="sequential")(x, scale, bias,
                                                          epsilon=np.float32(epsilon))

    def backward(x, scale, dy):
        results = (jax.ShapeDtypeStruct(x.shape, jnp.float32), _sums_shape(x))
        return jax.ffi.ffi_call("transferlab_onednn_layer_norm_backward", results,
                                vmap_method="sequential")(x, scale, dy,
                                                          epsilon=np.float32(epsilon))
    return (per_image(forward, "b r c, c, c -> b r c"),
            per_image(backward, "b r c, c, b r c -> b r c, b t c"))


def layer_norm(x, scale, bias, epsilon: float):
    """Flax's ``nn.LayerNorm`` over the last axis of float32 ``x`` (batch, rows, c):
    (x − mean)/√(var + epsilon)·scale + bias for each row, in one pass over memory; within
    1e-4 of Flax's, values and gradients, for inputs of unit scale."""
    return _per_image_layer_norm(float(epsilon))[0](x, scale, bias)


def layer_norm_backward(x, scale, dy, epsilon: float):
    """The gradient of ``layer_norm`` at ``x`` given ``dy``, in one pass over memory: (dx,
    sums), sums (batch, 2, c) holding each image's Σ dy·x̂ and Σ dy (the scale's and bias's
    gradients, summed over the images), x̂ the normalized x."""
    return _per_image_layer_norm(float(epsilon))[1](x, scale, dy)


def _gelu_backward_call(x, bias, y, dy):
    results = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
               jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), jnp.float32))
    return jax.ffi.ffi_call("transferlab_onednn_gelu_backward", results,
                            vmap_method="sequential")(x, bias, y, dy)


_per_image_gelu_backward = per_image(_gelu_backward_call,
                                     "b r c, c, b r c, b r c -> b r c, b c")


def gelu_backward(x, bias, y, dy):
    """The gradient of the exact GELU of ``x + bias`` (float32 ``x`` (batch, rows, c), ``bias``
    (c)) given ``dy``, from its output ``y`` and one exponential (``csrc/gelu.cc``): (du,
    sums), sums (batch, c) holding each image's Σ du over its rows (the bias's gradient, summed
    over the images). du within 1e-5 (relative) of float64's, across float32's range."""
    return _per_image_gelu_backward(x, bias, y, dy)


def _materialize_call(x):
    return jax.ffi.ffi_call("transferlab_onednn_materialize",
                            jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential",
                            input_output_aliases={0: 0})(x)


@functools.cache
def _per_image_materialize(rank: int):
    axes = " ".join(f"a{i}" for i in range(1, rank))
    return per_image(_materialize_call, f"b {axes} -> b {axes}")


@jax.custom_vjp
def materialize(x):
    """``x`` (at least 1-D) exactly, through a call that computes nothing
    (``csrc/materialize.cc``): XLA writes it to memory once, and every consumer reads it there.
    So is its gradient."""
    return _per_image_materialize(x.ndim)(x)


materialize.defvjp(lambda x: (materialize(x), None), lambda _, g: (materialize(g),))
