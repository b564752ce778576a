"""Convolutions and batched matrix products through oneDNN (the kernels PyTorch runs on the
CPU), as XLA FFI calls.

XLA:CPU computes a convolution's kernel gradient 1.5–3× slower than oneDNN, and strided
convolutions' input gradient up to 2.6× slower. ``conv`` runs all three passes of a float32
NHWC convolution (any groups, depthwise too; no dilation) with oneDNN's primitives instead,
through the handlers in ``csrc/onednn.cc``, built on first use with g++ against Debian's
``libdnnl-dev`` (``make setup`` installs it as root) and jaxlib's FFI headers, and cached in
``~/.cache/transferlab``. Under ``jit`` over a device mesh each device convolves its own shard
of the batch (``custom_partitioning``), and the kernel gradient is summed over the batch axis.

``dense`` runs a Dense layer over tokens as one matrix product per pass, its gradients
reading the operands transposed in place: on MKL's sgemm where the ``mkl`` wheel is installed
and the CPU is Intel's (``uses_mkl``; ``csrc/sgemm.cc``, the kernels PyTorch's Linear layers
run; 5-30% faster than oneDNN 2.6's matmul on ViT-S/16's shapes on a Xeon), else on oneDNN's
matmul (1.11–1.26× MKL's speed on an AMD EPYC).
``self_attention`` runs multi-head self-attention per image and head with the logits in cache,
from their product through the softmax to the product with the values (``csrc/attention.cc``),
reading q, k and v packed as one Dense layer's product writes them, adding that layer's bias,
and keeps each head's probabilities for the gradient, which recomputes none of the forward's.

``available()`` says whether the library loaded; where it did not (no oneDNN, no compiler),
``models.ops`` keeps XLA's convolutions and products, and ``unavailable_reason()`` says why.
``TRANSFERLAB_ONEDNN=0`` turns it off; ``disabled()`` does so while tracing (XLA's cost
analysis counts no flops in a foreign call).

The kernel gradient of a depthwise convolution whose window is not 3×3 (EfficientNet's and
MobileNetV3's 5×5) is this project's own (``csrc/depthwise_conv.cc``, OpenMP threads): oneDNN
runs those on its grouped kernel, 3–4× slower.

A training-mode batch norm's sums (``batch_norm_sums``, ``batch_norm_grad_sums``) are this
project's own too (``csrc/batch_norm.cc``): each pair in one pass over the activations, per image
(a mesh shards the batch), where XLA takes a pass per sum and materializes the gradient first.

So are a layer norm's forward and backward passes (``layer_norm``, ``layer_norm_backward``,
``csrc/layer_norm.cc``), one pass over memory each, the exact GELU's gradient with its bias's
(``gelu_backward``, ``csrc/gelu.cc``), and max pooling (``max_pool``, 4.7× faster
than XLA's reduce-window on ResNet's stem) and its gradient (``max_pool_backward``,
``csrc/max_pool.cc``), 5× faster than XLA's formulation of it.
``materialize`` computes nothing: it makes XLA write a value once for all its consumers.

3×3 stride-1 ungrouped convolutions (most of a ResNet's flops) run oneDNN's Winograd kernels
in all three passes: 1.4–2.1× faster than direct convolution on this project's CPU, values
within ~3e-6 of the largest output (direct and XLA differ from each other by about as much).
oneDNN has them for AVX-512 only; elsewhere (AVX2) they are this project's own
(``models.winograd``, ``csrc/winograd.cc``: ResNet-18's train step 3.1 → 6.1 img/s on a Zen 1).
``TRANSFERLAB_ONEDNN_WINOGRAD=0``, read while tracing, keeps them direct.

The library brings in GNU OpenMP, which reads its settings once, as it loads: this module loads
it with ``OPENMP_DEFAULTS`` (``OMP_WAIT_POLICY=PASSIVE``) unless the environment sets them. By
default an OpenMP worker spins for milliseconds after each call here, holding one of the cores
on which XLA runs the fused element-wise ops between two calls; passive, it sleeps at once (the
README's Speed section has the measurements). Where another library loaded OpenMP first
(``import torch`` before the first oneDNN call), its settings stay.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

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
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
# -fno-trapping-math: no code here reads floating-point exceptions, and without it GCC leaves
# scalar any loop that clamps a float before converting it to an integer (``Exp`` in
# csrc/vector_math.h) on CPUs without AVX-512's masks.
COMPILER_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-fopenmp", "-ffp-contract=fast",
                  "-fno-trapping-math")
Pads = tuple[tuple[int, int], tuple[int, int]]

_disabled_while_tracing = [False]


def enabled() -> bool:
    """Whether convolutions and batched products traced now go to oneDNN."""
    return (not _disabled_while_tracing[0] and os.environ.get("TRANSFERLAB_ONEDNN", "1") != "0"
            and jax.default_backend() == "cpu" and available())


def available() -> bool:
    return _library() is not None


def unavailable_reason() -> str | None:
    return None if available() else _library.reason


@contextlib.contextmanager
def disabled():
    """Convolutions and products traced inside do not go to oneDNN (for ``cost_analysis``
    flops). A function ``jit`` traced before keeps its trace: trace a new one."""
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
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(CSRC.glob("*.[ch]*")))
                            + jax.__version__.encode() + str(mkl_runtime()).encode()
                            + " ".join(COMPILER_FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transferlab"
    return cache / f"onednn-{digest}.so"


def build() -> Path:
    """Compile ``csrc/*.cc`` into one library (once: the result is cached by content), with
    ``sgemm.cc`` linked to MKL where ``mkl_runtime`` finds it."""
    path = library_path()
    if path.exists():
        return path
    if not HEADER.exists():
        raise OSError(f"oneDNN's headers are missing ({HEADER}): install Debian's libdnnl-dev "
                      "(`apt-get install libdnnl-dev`) or run `make setup` as root.")
    sources, libraries, mkl = SOURCES, ["-ldnnl"], mkl_runtime()
    if mkl:
        sources += (MKL_SOURCE,)
        libraries += [f"-L{mkl.parent}", f"-l:{mkl.name}", f"-Wl,-rpath,{mkl.parent}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        done = subprocess.run(
            ["g++", *COMPILER_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, sources), "-o",
             str(built), *libraries],
            capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"building {', '.join(s.name for s in sources)} failed:\n"
                          f"{done.stderr[-2000:]}")
        os.replace(built, path)  # atomic: concurrent processes each build, one file stays
    return path


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
        path = build()
        with _openmp_defaults():
            library = ctypes.CDLL(str(path))
    except OSError as e:
        _library.reason = str(e)
        logging.warning("CPU convolutions and products stay XLA's (slower): %s", e)
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
    """Whether Dense layers' products and the wide 1×1 convolutions (``sgemm_suits``) go to
    MKL's sgemm (``has_mkl``) rather than oneDNN's matmul: on Intel's CPUs, for which MKL's
    kernels are written (on a Xeon it ran ViT-S/16's products 5-30% faster than oneDNN 2.6's
    matmul), not on others (on an AMD EPYC of the Zen 4 family, oneDNN's ran them 1.11–1.26×
    faster than MKL's, which PyTorch's Linear layers run). ``TRANSFERLAB_MKL=1`` or ``0``
    decides instead; read while tracing."""
    choice = os.environ.get("TRANSFERLAB_MKL", "")
    if choice not in ("", "0", "1"):
        raise ValueError(f"TRANSFERLAB_MKL={choice!r}: set it to 1 (MKL's sgemm), 0 (oneDNN's "
                         "matmul) or leave it unset (MKL on Intel's CPUs only).")
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


def sgemm_suits(kernel_shape, strides, pads, groups: int) -> bool:
    """Whether a convolution runs as a Dense layer on MKL's sgemm (``dense``) instead, where
    ``uses_mkl``: 1×1, stride 1, unpadded, ungrouped, at least 128 channels in and out. There
    oneDNN 2.6's 1×1 kernels took 1.1–1.4× MKL's time over the three passes on a Xeon
    (ResNet-50's stages 2–4, the widest pointwise layers of MobileNetV2 and EfficientNet); with
    fewer channels they were as fast or faster."""
    return (tuple(kernel_shape[:2]) == (1, 1) and tuple(strides) == (1, 1) and groups == 1
            and not any(any(pad) for pad in pads) and min(kernel_shape[2:]) >= 128
            and uses_mkl())


def winograd_suits(kernel_shape, strides, groups: int) -> bool:
    """Whether a convolution goes to Winograd kernels: oneDNN's, or where the machine has none
    of oneDNN's, this project's (``models.winograd.suits``)."""
    return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1) and groups == 1
            and os.environ.get("TRANSFERLAB_ONEDNN_WINOGRAD", "1") != "0")


def _call(name: str, a, b, out_shape, geometry: tuple[tuple[int, int], Pads, int]):
    strides, ((top, bottom), (left, right)), groups = geometry
    kernel_shape = out_shape if name.endswith("backward_weights") else b.shape
    out = jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32)
    return jax.ffi.ffi_call(f"transferlab_onednn_{name}", out, vmap_method="sequential")(
        a, b, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
        pad_right=np.int64(right), groups=np.int64(groups),
        winograd=np.int64(winograd_suits(kernel_shape, strides, groups)))


def _output_shape(x_shape, window, strides, pads: Pads, channels: int):
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


def _batch_parallel(rule: str, local_fn, batch_in_output: bool):
    """``local_fn(a, b, out_shape, params)`` (``params`` static) partitioned over the batch
    (first) axis: each device runs it on its shard of ``a`` (and of ``b`` when the result has
    no batch axis, which is then summed over the devices); ``b`` is otherwise replicated."""
    @functools.partial(custom_partitioning, static_argnums=(2, 3))
    def fn(a, b, out_shape, params):
        return local_fn(a, b, out_shape, params)

    def output_sharding(mesh, arg_shapes):
        return NamedSharding(mesh, P(_batch_axis(arg_shapes[0]) if batch_in_output else None))

    def partition(out_shape, params, mesh, arg_shapes, result_shape):
        batch = _batch_axis(arg_shapes[0])
        sharded, replicated = NamedSharding(mesh, P(batch)), NamedSharding(mesh, P())
        operands = (sharded, replicated if batch_in_output else sharded)

        def lower(a, b):
            shape = (a.shape[0], *out_shape[1:]) if batch_in_output else out_shape
            out = local_fn(a, b, shape, params)
            return out if batch_in_output or batch is None else jax.lax.psum(out, batch)
        return mesh, lower, output_sharding(mesh, arg_shapes), operands

    fn.def_partition(
        infer_sharding_from_operands=lambda *a: output_sharding(a[2], a[3]),
        partition=partition, sharding_rule=rule,
        reduction_factors=() if batch_in_output else ("b",),
        need_replication_factors=_non_batch_factors(rule))
    return fn


# The kernel's input channels (d) are those of one group: c / groups.
_forward = _batch_parallel("b h w c, k l d o -> b i j o", functools.partial(_call, "forward"), True)
_backward_data = _batch_parallel("b i j o, k l d o -> b h w c",
                                 functools.partial(_call, "backward_data"), True)
_backward_weights = _batch_parallel("b h w c, b i j o -> k l d o",
                                    functools.partial(_call, "backward_weights"), False)
_depthwise_backward_weights = _batch_parallel(
    "b h w c, b i j o -> k l d o", functools.partial(_call, "depthwise_backward_weights"), False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, w, strides: tuple[int, int], pads: Pads, groups: int = 1):
    """Convolution of float32 NHWC ``x`` with an HWIO kernel ``w`` (no dilation), ``pads``
    explicit ((top, bottom), (left, right)), ``groups`` its ``feature_group_count``:
    ``lax.conv_general_dilated``'s values."""
    return _forward(x, w, _output_shape(x.shape, w.shape[:2], strides, pads, w.shape[3]), (strides, pads, groups))


def _conv_forward(x, w, strides, pads, groups):
    return conv(x, w, strides, pads, groups), (x, w)


def _conv_backward(strides, pads, groups, residuals, dy):
    x, w = residuals
    # oneDNN's depthwise kernel gradient is 3×3 only; its grouped one is 3–4× slower than ours
    own = groups == x.shape[-1] == w.shape[-1] and tuple(w.shape[:2]) != (3, 3)
    kernel_gradient = _depthwise_backward_weights if own else _backward_weights
    geometry = (strides, pads, groups)
    return (_backward_data(dy, w, x.shape, geometry), kernel_gradient(x, dy, w.shape, geometry))


conv.defvjp(_conv_forward, _conv_backward)


Axes = tuple[int, int, int, int]


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


_ROWS, _COLUMNS = (0, 1, 2, 3), (0, 1, 3, 2)  # a matrix's view: itself, or its transpose


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


_dense_forward = _batch_parallel("b r k, k n -> b r n", _matrix_product, True)
_dense_input_grad = _batch_parallel("b r n, k n -> b r k", _matrix_product, True)
_dense_kernel_grad = _batch_parallel("b r k, b r n -> k n", _matrix_product, False)


@jax.custom_vjp
def dense(x, w):
    """``x @ w`` of float32 ``x`` (batch, rows, k) and ``w`` (k, n), a Dense layer over tokens,
    as one product of (batch × rows) by k and k by n matrices; its gradients likewise, reading
    ``w`` and ``x`` transposed in place. A mesh shards the batch: each device multiplies its own
    rows, and the kernel gradient is summed over the devices."""
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


def _per_image(local, rule: str):
    """``local`` partitioned over the batch (first) axis of its operands and results: each
    device computes its own images; operands whose rule has no batch factor are replicated."""
    @custom_partitioning
    def fn(*args):
        return local(*args)

    operand_specs, result_specs = (side.split(",") for side in rule.split("->"))

    def output_sharding(mesh, arg_shapes, result_shape=None):
        sharded = NamedSharding(mesh, P(_batch_axis(arg_shapes[0])))
        return sharded if len(result_specs) == 1 else (sharded,) * len(result_specs)

    def partition(mesh, arg_shapes, result_shape):
        sharded = NamedSharding(mesh, P(_batch_axis(arg_shapes[0])))
        replicated = NamedSharding(mesh, P())
        operands = tuple(sharded if spec.split()[0] == "b" else replicated
                         for spec in operand_specs)
        return mesh, local, output_sharding(mesh, arg_shapes), operands

    fn.def_partition(infer_sharding_from_operands=output_sharding, partition=partition,
                     sharding_rule=rule, need_replication_factors=_non_batch_factors(rule))
    return fn


def _sums_call(x):
    return jax.ffi.ffi_call("transferlab_onednn_batch_norm_sums", _sums_shape(x),
                            vmap_method="sequential")(x)


_per_image_sums = _per_image(_sums_call, "b h w c -> b t c")


def batch_norm_sums(x):
    """(N, 2, C): Σ x and Σ x² over each image's pixels of float32 NHWC ``x``."""
    return _per_image_sums(x)


def _grad_sums_call(x, dy, affine):
    return jax.ffi.ffi_call("transferlab_onednn_batch_norm_grad_sums", _sums_shape(x),
                            vmap_method="sequential")(x, dy, affine)


_per_image_grad_sums = _per_image(_grad_sums_call, "b h w c, b h w c, r c -> b t c")


@functools.cache
def _per_image_activation_grad_sums(activation: str):
    code = np.int64(BATCH_NORM_ACTIVATIONS[activation])

    def local(x, y, dy, affine):
        shapes = (_sums_shape(x), jax.ShapeDtypeStruct(x.shape, jnp.float32))
        return jax.ffi.ffi_call("transferlab_onednn_batch_norm_activation_grad_sums", shapes,
                                vmap_method="sequential")(x, y, dy, affine, activation=code)
    return _per_image(local, "b h w c, b h w c, b h w c, r c -> b t c, b h w c")


def batch_norm_grad_sums(x, y, dy, a, b, mean, activation: str | None = None):
    """((N, 2, C), g): Σ g and Σ g·(x − mean) over each image's pixels of float32 NHWC ``x``
    and ``dy``, and g = dy · act'(a·x + b) for the named ``activation`` (None: g = dy), where
    y = act(a·x + b) is the forward pass's output (unused without an activation)."""
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
        out = jax.ShapeDtypeStruct(_output_shape(x.shape, window, strides, pads, x.shape[3]),
                                   jnp.float32)
        return jax.ffi.ffi_call("transferlab_onednn_max_pool_forward", out,
                                vmap_method="sequential")(
            x, **_pool_attributes(window, strides, pads))
    return _per_image(local, "b h w c -> b i j c")


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], pads: Pads):
    """Max pooling of float32 NHWC ``x`` over ``window`` at ``strides``, padded ((top, bottom),
    (left, right)) with -inf: ``lax.reduce_window``'s values (NaN wins), in one pass."""
    return _per_image_max_pool(tuple(window), tuple(strides), tuple(pads))(x)


@functools.cache
def _per_image_max_pool_backward(window: tuple[int, int], strides: tuple[int, int],
                                 pads: Pads):
    def local(x, y, dy):
        return jax.ffi.ffi_call("transferlab_onednn_max_pool_backward",
                                jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                vmap_method="sequential")(
            x, y, dy, **_pool_attributes(window, strides, pads))
    return _per_image(local, "b h w c, b i j c, b i j c -> b h w c")


def max_pool_backward(x, y, dy, window: tuple[int, int], strides: tuple[int, int], pads: Pads):
    """The gradient of max pooling float32 NHWC ``x`` (``y`` the pooled result, ``dy`` its
    gradient) over ``window`` at ``strides``, padded ((top, bottom), (left, right)) with -inf:
    each output's gradient goes to the first tap (row-major) that holds its maximum."""
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


_attention_forward = _per_image(_attention_forward_call,
                                "b t i h d, i h d -> b t h d, b h t s")
_attention_backward = _per_image(_attention_backward_call,
                                 "b t i h d, i h d, b h t s, b t h d -> b t i h d, b i h d")


@jax.custom_vjp
def self_attention(qkv, bias):
    """softmax(q·kᵀ/√depth)·v for each image and head of q, k, v = ``qkv[:, :, 0]``,
    ``qkv[:, :, 1]``, ``qkv[:, :, 2]`` plus ``bias`` (3, heads, depth), float32 ``qkv`` (batch,
    tokens, 3, heads, depth): the product of one Dense layer with the three kernels side by
    side, read in place, the layer's bias added on the way. One task per image and head whose
    logits stay in cache from their product to the product with v. Each head's probabilities
    (tokens × tokens) go to memory once, for the gradient (packed like qkv, for the product
    back through that layer, and the bias's from the same pass), which then recomputes neither
    the logits nor their exponentials. A mesh shards the batch."""
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
    return (_per_image(forward, "b r c, c, c -> b r c"),
            _per_image(backward, "b r c, c, b r c -> b r c, b t c"))


def layer_norm(x, scale, bias, epsilon: float):
    """Layer normalization over the last axis of float32 ``x`` (batch, rows, c):
    (x − mean)/√(var + epsilon)·scale + bias for each row, in one pass over memory."""
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


_per_image_gelu_backward = _per_image(_gelu_backward_call,
                                      "b r c, c, b r c, b r c -> b r c, b c")


def gelu_backward(x, bias, y, dy):
    """The gradient of the exact GELU of ``x + bias`` (float32 ``x`` (batch, rows, c), ``bias``
    (c)) given ``dy``, from its output ``y`` and one exponential (``csrc/gelu.cc``): (du,
    sums), sums (batch, c) holding each image's Σ du over its rows (the bias's gradient, summed
    over the images)."""
    return _per_image_gelu_backward(x, bias, y, dy)


def _materialize_call(x):
    return jax.ffi.ffi_call("transferlab_onednn_materialize",
                            jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential",
                            input_output_aliases={0: 0})(x)


@functools.cache
def _per_image_materialize(rank: int):
    axes = " ".join(f"a{i}" for i in range(1, rank))
    return _per_image(_materialize_call, f"b {axes} -> b {axes}")


@jax.custom_vjp
def materialize(x):
    """``x`` (at least 1-D), through a call that computes nothing (``csrc/materialize.cc``): XLA
    writes it to memory once, and every consumer reads it there. So is its gradient."""
    return _per_image_materialize(x.ndim)(x)


materialize.defvjp(lambda x: (materialize(x), None), lambda _, g: (materialize(g),))
