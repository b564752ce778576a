"""Orbax checkpoints of a run: ``<dir>/checkpoints/<step>/{variables,train_state,meta}``.

``variables`` holds ``params`` and ``batch_stats``; ``train_state`` the optimizer state, step and
RNG (training runs only); ``meta`` (JSON) the model, its preprocessing and the config it came
from. Converted weights are written the same way at step 0, without ``train_state``.

Saves are synchronous, and once orbax has finalized a step, ``<step>/SHA256SUMS``
(``research.checksums``) lists every file's hash. A restore checks it first: a damaged step is
named as such, and the latest intact step before it is restored instead, with a warning; a
step without a manifest (written before checksums existed) loads with a warning.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from research import checksums
from research.errors import CheckpointError

VARIABLES, TRAIN_STATE, META = "variables", "train_state", "meta"
SUBDIR = "checkpoints"
_LOG = logging.getLogger(__name__)
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def checkpoint_dir(directory: str | Path) -> Path:
    """The orbax directory of a run's workdir (or of the orbax directory itself)."""
    directory = Path(directory).expanduser().resolve()
    return directory / SUBDIR if (directory / SUBDIR).is_dir() else directory


def manager(orbax_dir: str | Path, *, max_to_keep: int | None = 2,
            create: bool = True) -> ocp.CheckpointManager:
    # Synchronous: a failed asynchronous save leaves orbax threads that block the exit.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=False)
    handlers = {VARIABLES: ocp.StandardCheckpointHandler(),
                TRAIN_STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(orbax_dir).resolve(), options=options,
                                 item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, variables, meta: dict, train_state=None) -> None:
    """Save ``step`` and then its ``SHA256SUMS``; a save that fails (a full disk) leaves no
    part of ``step`` behind and raises ``CheckpointError``, the earlier steps kept."""
    items = {VARIABLES: ocp.args.StandardSave(variables), META: ocp.args.JsonSave(meta)}
    if train_state is not None:
        items[TRAIN_STATE] = ocp.args.StandardSave(train_state)
    threads_before = set(threading.enumerate())
    try:
        mngr.save(step, args=ocp.args.Composite(**items))
        mngr.wait_until_finished()
        if jax.process_index() == 0:
            checksums.write(Path(mngr.directory) / str(step))
    except OSError as e:
        _await_writers(threads_before)
        _discard(Path(mngr.directory), step)
        kept = latest_step(mngr.directory)
        fix = "free space on the device" if e.errno == errno.ENOSPC else "fix the cause"
        raise CheckpointError(
            f"step {step} could not be saved in {mngr.directory} ({e}) and was discarded; "
            f"{f'step {kept} is intact' if kept is not None else 'no step was saved before'}: "
            f"{fix} and rerun to resume.") from None


def latest_step(orbax_dir: str | Path) -> int | None:
    """The latest finalized step in ``orbax_dir``, or None where it holds none or does not
    exist. Creates nothing and, unlike a manager, syncs no processes: on several hosts each
    may call it while another is creating the directory."""
    if not Path(orbax_dir).is_dir():
        return None
    return max(ocp.utils.checkpoint_steps(orbax_dir), default=None)


def open_existing(directory: str | Path) -> tuple[ocp.CheckpointManager, int]:
    """The manager of a checkpoint directory and its latest step, or a CheckpointError."""
    path = checkpoint_dir(directory)
    if not path.is_dir():
        raise CheckpointError(f"{directory} is not a checkpoint: no such directory. Pass the "
                              "workdir of a training run or the output of scripts.convert.")
    mngr = manager(path, create=False, max_to_keep=None)
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(
            f"{directory} is not a checkpoint: it holds no {SUBDIR}/<step>/ directory with "
            f"{VARIABLES} and {META}. Pass the workdir of a training run or the output of "
            "scripts.convert.")
    return mngr, step


def restore(directory: str | Path, *, with_train_state_like=None, variables_like=None,
            set_aside_damaged: bool = False):
    """``(variables, meta, train_state or None)`` of the latest intact step under ``directory``.

    Arrays restore onto the shardings of ``variables_like`` and ``with_train_state_like``
    (trees of ``jax.Array`` or ``jax.ShapeDtypeStruct`` with shardings); without
    ``variables_like``, as numpy arrays on the host. Either way none of the writer's topology
    is read, so a checkpoint written on one mesh or by several processes restores on another
    mesh or in another number of processes. A damaged later step is skipped with a warning, and
    with ``set_aside_damaged`` renamed ``<step>.damaged`` so that a resumed run can save that
    step again.
    """
    def items(mngr, step):
        like = (variables_like if variables_like is not None
                else _host_arrays(mngr.item_metadata(step)[VARIABLES]))
        out = {VARIABLES: ocp.args.StandardRestore(_abstract(like)), META: ocp.args.JsonRestore()}
        if with_train_state_like is not None:
            out[TRAIN_STATE] = ocp.args.StandardRestore(_abstract(with_train_state_like))
        return out

    restored = _restore_intact(directory, items, set_aside_damaged)
    return restored[VARIABLES], restored[META], restored.get(TRAIN_STATE)


def _abstract(tree):
    """Shapes, dtypes and shardings of ``tree``'s arrays; numpy arrays stay as they are."""
    return jax.tree.map(lambda a: a if isinstance(a, np.ndarray) else
                        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _host_arrays(metadata):
    """Unwritten numpy arrays of the shapes and dtypes an item's metadata lists: orbax restores
    into numpy arrays for them, wherever the writer's arrays lay."""
    return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata.tree)


def read_meta(directory: str | Path) -> dict:
    """The meta (model, preprocessing, config) of the latest intact step under ``directory``."""
    return _restore_intact(directory, lambda mngr, step: {META: ocp.args.JsonRestore()},
                           False)[META]


def _restore_intact(directory, items, set_aside_damaged: bool):
    """The restored ``items(mngr, step)`` of the latest intact step under ``directory``."""
    mngr, _ = open_existing(directory)
    path = Path(mngr.directory)
    try:
        damaged = []
        for step in sorted(mngr.all_steps(), reverse=True):
            outcome = _restored_or_damage(mngr, path, step, items)
            if not isinstance(outcome, str):
                break
            damaged.append(step)
            _LOG.warning("checkpoint %s/%d is damaged (%s)", path, step, outcome)
        else:
            raise CheckpointError(
                f"every step of {path} is damaged ({', '.join(map(str, damaged))}: see the "
                f"warnings above); restore {path} from a copy, or delete it to train from the "
                "start.")
    finally:
        mngr.close()
    if damaged:
        _LOG.warning("restored step %d of %s instead of damaged step(s) %s", step, path, damaged)
        if set_aside_damaged and jax.process_index() == 0:
            for bad in damaged:
                (path / str(bad)).rename(path / f"{bad}.damaged")
    return outcome


def _restored_or_damage(mngr, path: Path, step: int, items):
    """The restored items of ``step`` (orbax's Composite), or what is wrong with it (a str)."""
    step_dir = path / str(step)
    if checksums.has_manifest(step_dir):
        problems = checksums.problems(step_dir)
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            return f"checksums differ: {'; '.join(problems[:3])}{more}"
        intact = True
    else:
        _LOG.warning("checkpoint %s has no %s (written before checksums, or killed just after "
                     "orbax finalized it): loaded unverified", step_dir, checksums.MANIFEST)
        intact = False
    try:
        return mngr.restore(step, args=ocp.args.Composite(**items(mngr, step)))
    except Exception as e:  # orbax raises a bare Exception for a truncated file
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        if intact:
            raise CheckpointError(
                f"the checkpoint {step_dir} is intact but does not fit this run "
                f"({type(e).__name__}: {first_line}): it holds another model or optimizer "
                "state; train in another workdir.") from None
        return f"unreadable: {type(e).__name__}: {first_line}"


def _await_writers(threads_before: set, timeout: float = 30.0) -> None:
    """Wait for the writes a failed save left running: when one item fails, orbax's threads
    writing the others go on, and would recreate a step directory removed before they end."""
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - threads_before:
        while time.monotonic() < deadline:
            try:
                thread.join(max(deadline - time.monotonic(), 0))
                break
            except RuntimeError:  # listed while it starts, and not joinable until it has
                time.sleep(0.01)


def _discard(orbax_dir: Path, step: int) -> None:
    """Remove what a failed save of ``step`` wrote: its temporary or unfinished directory."""
    if jax.process_index() != 0:
        return
    for leftover in orbax_dir.glob(f"{step}*"):
        if leftover.name == str(step) or leftover.name.startswith(f"{step}{TMP_SUFFIX}"):
            shutil.rmtree(leftover, ignore_errors=True)
