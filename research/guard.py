"""What keeps a run from losing work or writing nonsense: stop signals, finite losses and
parameters, a rerun's config against its workdir's, and the checks made before anything is
written (values, model name, workdir).

``handle_stop_signals`` (the training commands run under it) turns SIGTERM and SIGINT into a
flag that the training loop reads after each step: the loop then saves that step and ends with
``Interrupted`` (the command exits 143 for SIGTERM, 130 for SIGINT); a second signal ends the
process at once. On several hosts every process must receive the signal, as a preemption
sends it.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import signal
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

import models
from research import checkpoints
from research.errors import ConfigError, Interrupted, TrainingDiverged

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Settings a rerun may change in a workdir: how long it runs, where data comes from, how it
# evaluates, checkpoints, logs and spreads over devices. Any other change is refused.
RESUMABLE_KEYS = ("name", "train.epochs", "train.eval_every_epochs",
                  "train.checkpoint_every_epochs", "train.keep_checkpoints", "train.progress",
                  "train.eval_batch_size", "train.allow_config_change", "data.tfds_dir",
                  "data.workers", "mesh.data", "mesh.fsdp")

_received: list[int] = []


@contextlib.contextmanager
def handle_stop_signals():
    """Within: the first SIGTERM or SIGINT is recorded for the training loop (``stop_signal``),
    a second one ends the process at once. Outside the main thread: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _record) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()


def _record(signum, frame) -> None:
    if _received:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _received.append(signum)


def stop_signal() -> int | None:
    """The stop signal received (under ``handle_stop_signals``), or None."""
    return _received[0] if _received else None


def raise_if_stopped(step: int, workdir: Path) -> None:
    """``Interrupted`` once the loop has saved ``step`` after a stop signal."""
    if _received:
        signum = _received[0]
        raise Interrupted(f"{signal.Signals(signum).name} received: step {step} is saved in "
                          f"{workdir}; rerun the same command to resume.", 128 + signum)


class LossWatch:
    """Each step's loss is checked once the next step has been dispatched: reading it waits
    for that step alone, while the next one runs (no sync of its own)."""

    def __init__(self, cfg):
        self.cfg, self._pending = cfg, None

    def after_step(self, step: int, metrics: dict) -> None:
        previous, self._pending = self._pending, (step, metrics["loss"])
        if previous is not None:
            self.check(*previous)

    def check(self, step: int, loss) -> None:
        if not math.isfinite(float(loss)):
            raise TrainingDiverged(f"the training loss is {float(loss)} at step {step}: "
                                   f"{_fix(self.cfg)}")


def _fix(cfg) -> str:
    clip = ("set optim.grad_clip (e.g. 1.0)" if not cfg.optim.grad_clip
            else f"lower optim.grad_clip (now {cfg.optim.grad_clip})")
    return (f"training diverged and nothing after the last finite checkpoint was saved; lower "
            f"optim.lr (now {cfg.optim.lr:g}), {clip} or add optim.warmup_steps, and rerun in a "
            "new workdir.")


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
                             or [jnp.array(True)]))


def check_finite_variables(variables, step: int, cfg) -> None:
    """``TrainingDiverged`` where a parameter or statistic of ``variables`` is NaN or ±inf."""
    if not bool(_all_finite(variables)):
        raise TrainingDiverged(f"a parameter is not finite after step {step}: {_fix(cfg)}")


def json_safe(record: dict) -> dict:
    """``record`` with NaN and ±inf as None, so that its JSON is strict (``null``)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def check_resumable(saved_config: dict, cfg) -> None:
    """Refuse to resume a workdir whose checkpoint came from another config, beyond
    ``RESUMABLE_KEYS``, unless ``train.allow_config_change``."""
    if cfg.train.get("allow_config_change", False):
        return
    old, new = _flat(saved_config), _flat(cfg.to_dict())
    absent = "<absent>"
    differing = sorted(k for k in old.keys() | new.keys()
                       if k not in RESUMABLE_KEYS and old.get(k, absent) != new.get(k, absent))
    if differing:
        shown = ", ".join(f"{k}: {old.get(k, absent)!r} → {new.get(k, absent)!r}"
                          for k in differing[:8])
        more = f" and {len(differing) - 8} more" if len(differing) > 8 else ""
        raise ConfigError(f"the workdir's checkpoint was trained under another config ({shown}"
                          f"{more}); use another --workdir, or continue under the new config "
                          "with train.allow_config_change=True.")


def _flat(config: dict, prefix: str = "") -> dict:
    """Dotted keys to values, tuples as lists (as JSON holds them)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _as_json(value)
    return flat


def _as_json(value):
    if isinstance(value, (tuple, list)):
        return [_as_json(v) for v in value]
    return {} if isinstance(value, dict) else value


def validate(cfg) -> None:
    """Refuse values that cannot train, before anything is read or written."""
    lr = cfg.optim.lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"optim.lr={lr!r} must be a finite number above 0 (e.g. 0.05).")
    for key in ("batch_size", "eval_batch_size"):
        value = cfg.train[key]
        if not (isinstance(value, int) and value > 0):
            raise ConfigError(f"train.{key}={value!r} must be a whole number above 0.")
    if not (math.isfinite(cfg.train.epochs) and cfg.train.epochs > 0):
        raise ConfigError(f"train.epochs={cfg.train.epochs!r} must be above 0.")
    name = cfg.model.name
    if name and name not in models.list_models():
        close = difflib.get_close_matches(name, models.list_models(), n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see models.list_models()."
        raise ConfigError(f"model.name={name!r} is not a model here; {hint}")


def check_workdir(workdir: str | Path, cfg) -> None:
    """Refuse a workdir that is a file, holds a ``checkpoints`` file, cannot be created or
    written (probed with a temporary directory, removed), or holds a checkpoint of another
    config (``check_resumable``)."""
    workdir = Path(workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; pass a directory.")
    orbax_dir = workdir / checkpoints.SUBDIR
    if orbax_dir.exists() and not orbax_dir.is_dir():
        raise ConfigError(f"{orbax_dir} is a file, not a checkpoint directory; move it away or "
                          "pass another --workdir.")
    existing = next(p for p in (workdir, *workdir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--workdir {workdir}: {existing} is a file; pass a directory.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".transferlab-probe-", dir=existing))
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} cannot be written ({e.strerror} in {existing}); "
                          "pass a directory you can write to.") from None
    if checkpoints.latest_step(orbax_dir) is not None:
        check_resumable(checkpoints.read_meta(workdir)["config"], cfg)
