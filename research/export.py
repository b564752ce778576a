"""A run's train and eval steps as serialized ``jax.export`` modules, for deployment on a GPU,
a TPU or a CPU without this code (as Kauldron writes its exports beside a run).

``export_train_step`` and ``export_eval_step`` export the steps ``research.train`` runs
(``make_train_step``, ``make_eval_step``) for the named platforms. Both exported functions take
flat ``{path: array}`` dicts, the form written beside them (safetensors), so that calling one
needs no Python class of ours:

- ``train(state, images, labels) → (state, {"loss", "accuracy"})``, ``state`` the whole
  ``TrainState`` (``params/…``, ``batch_stats/…``, ``opt_state/…``, ``step``, ``rng``);
- ``eval(variables, images, labels, mask) → {"loss_sum", "correct", "count"}``, ``variables``
  the ``params/…`` and ``batch_stats/…``.

Images are uint8 NHWC of the run's image shape, batches of ``train.batch_size`` and
``train.eval_batch_size`` rows (shapes are fixed), over the experiment's mesh (one device
where ``mesh.data=1``). For ``cuda`` and ``tpu`` the modules hold XLA's own lowering of every
operation: ``models.cpu`` chooses its kernels with ``lax.platform_dependent``, so they lower
for the CPU only (``cpu_only_calls`` finds any that would not). A ``cpu`` export is traced with
XLA's lowering too (``models.cpu.xla_lowering_only``), so that it runs in any JAX process,
without the native library.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import export as jax_export
from safetensors.numpy import load_file, save_file

from models import cpu
from research import checkpoints, prefix_cache, sharding, train
from research.errors import ConfigError

ACCELERATORS = ("cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's names
SUBDIR = "export"
VARIABLES_FILE, TRAIN_STATE_FILE, INFO_FILE = ("variables.safetensors", "train_state.safetensors",
                                               "export.json")
# The CPU kernels' FFI targets (models.cpu.native) are all named transferlab_…. Host
# callbacks (jax.pure_callback, io_callback, debug.print) never reach a module: jax.export
# refuses to export them.
_CPU_ONLY_TARGET = re.compile(r"transferlab_\w*")
_CUSTOM_CALL = re.compile(r'stablehlo\.custom_call @([\w.$-]+)|call_target_name = "([^"]+)"')


def flat(tree) -> dict[str, jax.Array]:
    """``{"params/stem/conv/kernel": leaf, …}``: every leaf of ``tree`` by its path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}
    assert len(out) == len(leaves), "two leaves share a path"
    return out


def unflat(like, arrays: dict) -> object:
    """``arrays`` (as ``flat`` writes them) in the structure of ``like``."""
    return jax.tree.unflatten(jax.tree.structure(like), [arrays[p] for p in flat(like)])


def custom_call_targets(exported: jax_export.Exported) -> set[str]:
    """The targets of every custom call in the exported module."""
    return {a or b for a, b in _CUSTOM_CALL.findall(exported.mlir_module())}


def cpu_only_calls(exported: jax_export.Exported) -> set[str]:
    """The custom calls in ``exported`` that run on the CPU only (this project's native
    kernels); empty for a module a GPU or TPU can run."""
    return {t for t in custom_call_targets(exported) if _CPU_ONLY_TARGET.fullmatch(t)}


def export_train_step(exp: train.Experiment, platforms: Sequence[str],
                      cache: prefix_cache.PrefixCache | None = None,
                      state: train.TrainState | None = None) -> jax_export.Exported:
    """``make_train_step(exp, cache)`` exported for ``platforms``, on flat states shaped as
    ``state`` (default ``exp.state``); with a ``cache``, images are the frozen prefix's outputs."""
    state = exp.state if state is None else state
    b, rows = exp.cfg.train.batch_size, sharding.rows(exp.mesh)
    image = jax.ShapeDtypeStruct((b, *exp.train_split.image_shape), jnp.uint8)
    if cache is not None:
        image = jax.eval_shape(cache.prefix, state.variables(), image)
    with _lowering(platforms):
        step = train.make_train_step(exp, cache)

        def train_flat(arrays, images, labels):
            new_state, metrics = step(unflat(state, arrays), images, labels)
            return flat(new_state), metrics

        return jax_export.export(jax.jit(train_flat), platforms=tuple(platforms))(
            _abstract(flat(state)), _abstract(image, rows),
            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows))


def export_eval_step(exp: train.Experiment, platforms: Sequence[str],
                     state: train.TrainState | None = None) -> jax_export.Exported:
    """``make_eval_step(exp)`` exported for ``platforms``, on flat variables shaped as
    ``state.variables()`` (default ``exp.state``)."""
    variables = (exp.state if state is None else state).variables()
    b, rows = exp.cfg.train.eval_batch_size, sharding.rows(exp.mesh)
    with _lowering(platforms):
        step = train.make_eval_step(exp)

        def eval_flat(arrays, images, labels, mask):
            return step(unflat(variables, arrays), images, labels, mask)

        return jax_export.export(jax.jit(eval_flat), platforms=tuple(platforms))(
            _abstract(flat(variables)),
            jax.ShapeDtypeStruct((b, *exp.train_split.image_shape), jnp.uint8, sharding=rows),
            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((b,), jnp.float32, sharding=rows))


def write(directory: str | Path, exp: train.Experiment, state: train.TrainState,
          platforms: Sequence[str]) -> list[Path]:
    """Write ``<directory>/export/``: ``{eval,train}.<platform>.bin`` (serialized
    ``jax.export``) for each platform, ``variables.safetensors`` and ``train_state.safetensors``
    (the flat inputs of the two) from ``state``, and ``export.json`` (shapes, model, platforms).
    Returns the files written."""
    out = Path(directory) / SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for platform in platforms:
        for name, exported in (("eval", export_eval_step(exp, [platform], state)),
                               ("train", export_train_step(exp, [platform], state=state))):
            written.append(out / f"{name}.{platform}.bin")
            written[-1].write_bytes(exported.serialize())
    for name, tree in ((VARIABLES_FILE, state.variables()), (TRAIN_STATE_FILE, state)):
        save_file({p: np.asarray(v) for p, v in flat(jax.device_get(tree)).items()}, out / name)
        written.append(out / name)
    info = dict(platforms=list(platforms), image_shape=list(exp.train_split.image_shape),
                image_dtype="uint8", train_batch_size=exp.cfg.train.batch_size,
                eval_batch_size=exp.cfg.train.eval_batch_size, devices=exp.mesh.size,
                step=int(state.step), model=exp.model_meta, preprocess=exp.preprocess_spec,
                num_classes=exp.train_split.num_classes)
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return written + [out / INFO_FILE]


def load(path: str | Path) -> jax_export.Exported:
    """A step written by ``write``; call it as ``load(path).call(arrays, images, …)``."""
    return jax_export.deserialize(bytearray(Path(path).read_bytes()))


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """``variables.safetensors`` or ``train_state.safetensors`` as the flat dict a step takes."""
    return load_file(str(path))


def _abstract(tree, sharding_=None):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=sharding_ or getattr(a, "sharding", None)), tree)


def _lowering(platforms: Sequence[str]):
    """XLA's own lowering where the CPU is a target (``models.cpu.xla_lowering_only``), so that
    no native kernel is in the module; accelerators get the steps as ``research.train`` traces
    them."""
    return cpu.xla_lowering_only() if "cpu" in platforms else contextlib.nullcontext()


def from_run(workdir: str | Path) -> tuple[train.Experiment, train.TrainState]:
    """The experiment of a training run's workdir (its own config, on one device) and the
    state of its latest checkpoint. Reads the run's dataset for its shapes; writes nothing."""
    _, meta, _ = checkpoints.restore(workdir)
    cfg = ml_collections.ConfigDict(meta["config"])
    # The run's own checkpoint gives the architecture, its options and the preprocessing.
    cfg.init.checkpoint, cfg.model.name, cfg.mesh.data = str(Path(workdir).resolve()), "", 1
    cfg.train.progress = False
    exp = train.build(cfg)
    return exp, train._resume(exp, Path(workdir))


def check_platforms(platforms: Sequence[str]) -> None:
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ConfigError(f"--platforms {','.join(platforms)}: {unknown or 'none'} unknown; "
                          f"name one or more of {','.join(PLATFORMS)}.")
