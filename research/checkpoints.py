"""Orbax checkpoints of a run: ``<dir>/checkpoints/<step>/{variables,train_state,meta}``.

``variables`` holds ``params`` and ``batch_stats``; ``train_state`` the optimizer state, step and
RNG (training runs only); ``meta`` (JSON) the model, its preprocessing and the config it came
from. Converted weights are written the same way at step 0, without ``train_state``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from research.errors import CheckpointError

VARIABLES, TRAIN_STATE, META = "variables", "train_state", "meta"
SUBDIR = "checkpoints"


def checkpoint_dir(directory: str | Path) -> Path:
    """The orbax directory of a run's workdir (or of the orbax directory itself)."""
    directory = Path(directory).expanduser().resolve()
    return directory / SUBDIR if (directory / SUBDIR).is_dir() else directory


def manager(orbax_dir: str | Path, *, max_to_keep: int | None = 2,
            create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    handlers = {VARIABLES: ocp.StandardCheckpointHandler(),
                TRAIN_STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(orbax_dir).resolve(), options=options,
                                 item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, variables, meta: dict, train_state=None) -> None:
    items = {VARIABLES: ocp.args.StandardSave(variables), META: ocp.args.JsonSave(meta)}
    if train_state is not None:
        items[TRAIN_STATE] = ocp.args.StandardSave(train_state)
    mngr.save(step, args=ocp.args.Composite(**items))


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


def restore(directory: str | Path, *, with_train_state_like=None, variables_like=None):
    """``(variables, meta, train_state or None)`` of the latest step under ``directory``.

    Arrays restore onto the shardings of ``variables_like`` and ``with_train_state_like``
    (trees of ``jax.Array`` or ``jax.ShapeDtypeStruct`` with shardings); without
    ``variables_like``, as numpy arrays on the host. Either way none of the writer's topology
    is read, so a checkpoint written on one mesh or by several processes restores on another
    mesh or in another number of processes.
    """
    mngr, step = open_existing(directory)
    try:
        if variables_like is None:
            variables_like = _host_arrays(mngr.item_metadata(step)[VARIABLES])
        items = {VARIABLES: ocp.args.StandardRestore(_abstract(variables_like)),
                 META: ocp.args.JsonRestore()}
        if with_train_state_like is not None:
            items[TRAIN_STATE] = ocp.args.StandardRestore(_abstract(with_train_state_like))
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"the checkpoint {checkpoint_dir(directory)}/{step} cannot be read "
                              f"({type(e).__name__}: {e}); it is corrupt or incomplete.") from None
    finally:
        mngr.close()
    return (restored[VARIABLES], restored[META],
            restored[TRAIN_STATE] if with_train_state_like is not None else None)


def _abstract(tree):
    """Shapes, dtypes and shardings of ``tree``'s arrays; numpy arrays stay as they are."""
    return jax.tree.map(lambda a: a if isinstance(a, np.ndarray) else
                        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _host_arrays(metadata):
    """Unwritten numpy arrays of the shapes and dtypes an item's metadata lists: orbax restores
    into numpy arrays for them, wherever the writer's arrays lay."""
    return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata.tree)
