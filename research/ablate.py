"""Sweeps: a config's grid of settings × seeds, a workdir per run, results with statistics.

A sweep config has ``transfer`` (the training config every run starts from), ``sweep``
(``configs.common.sweep_config``: ``seeds``, ``grid``, and the plot's ``x`` and ``lines``) and
optionally ``pretrain`` (a training config run once into ``<workdir>/pretrain``, unless its
``init.checkpoint`` names existing weights, which are then used as they are).

The grid is a tuple of points (in the spirit of big_vision's ``sweep_*`` and Kauldron's
``sweep()``; ``axis`` and ``product`` build them). A point is a dict: a dotted key
(``freeze.depth``, ``optim.lr``, any field of ``transfer``) is set in the run's config, a key
without a dot (``regime``, ``n``) is a label, a column of the results that tells runs apart.
Every point runs once per seed (``train.seed``) in ``<workdir>/runs/<name>``, its name made of
its labels, its numbers and the seed: a finished run (``result.json``) is read back, an
interrupted one resumes from its checkpoint. ``init.checkpoint`` may say ``{pretrain}`` (the
pretrained checkpoint), ``{runs}`` (``<workdir>/runs``) and ``{seed}``, so that a run starts from
another of the same sweep listed before it (Yosinski's AnB from baseA). A run with
``freeze.cache_prefix`` and nothing frozen trains without it. A point's ``choose`` (dotted key →
candidate values) picks each value by accuracy on a validation split held out of the training
examples (``sweep.holdout``; ``choose``), then trains with it: Kornblith's L2 strength.

Every run is checked before any trains: unknown keys, an empty grid, a freeze depth beyond the
model's blocks, classes a dataset lacks. Runs compile through JAX's persistent compilation
cache, in ``<workdir>/xla_cache`` unless one is set already (``JAX_COMPILATION_CACHE_DIR``), so
runs of the same program (model, frozen set, shapes) compile it once. ``research.summary``
writes the outputs: results.csv, summary.csv, summary.md and the plot.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import shlex
from pathlib import Path

import jax

import models
from research import config, data, summary, train
from research.errors import ConfigError

RESULT = "result.json"


def axis(key: str, values) -> tuple[dict, ...]:
    """One axis of a grid: ``axis("freeze.depth", (0, 1))`` → ``({"freeze.depth": 0}, …)``."""
    return tuple({key: value} for value in values)


def product(*axes) -> tuple[dict, ...]:
    """Every combination of one point from each axis, merged (the last axis varies fastest)."""
    return tuple({k: v for point in combination for k, v in point.items()}
                 for combination in itertools.product(*axes))


@dataclasses.dataclass(frozen=True)
class Run:
    point: tuple[tuple[str, object], ...]  # the grid point's keys and values, in order
    seed: int

    @property
    def point_name(self) -> str:
        parts = [str(v) for k, v in self.point if "." not in k and isinstance(v, str)]
        parts += [f"{k.rpartition('.')[2]}{v}" for k, v in self.point
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", "_".join(parts) or "point")

    @property
    def name(self) -> str:
        return f"{self.point_name}_seed{self.seed}"

    @property
    def settings(self) -> dict:
        """The point as a dict: dotted keys and labels."""
        return dict(self.point)


def plan_runs(cfg) -> list[Run]:
    """The sweep's runs, point by point, each point's seeds together; refuses an empty grid
    and two points of the same name."""
    grid, seeds = tuple(cfg.sweep.grid), tuple(cfg.sweep.seeds)
    if not grid or not seeds:
        raise ConfigError(f"the sweep is empty ({len(grid)} grid points × {len(seeds)} seeds): "
                          "set sweep.grid and sweep.seeds.")
    runs = [Run(tuple(dict(point).items()), seed) for point in grid for seed in seeds]
    names = [run.name for run in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"sweep points share the names {twice}: give them distinct labels "
                          "(a key without a dot, such as regime).")
    return runs


def run_config(cfg, run: Run, workdir: Path):
    """The training config of ``run``: ``cfg.transfer`` with the point's keys and the seed."""
    c = copy.deepcopy(cfg.transfer)
    c.name = run.name
    c.train.seed = run.seed
    for key, value in run.point:
        if "." in key:
            config.override(c, key, value)
    c.init.checkpoint = c.init.checkpoint.format(
        pretrain=_pretrained_dir(cfg, workdir), runs=workdir / "runs", seed=run.seed)
    c.freeze.cache_prefix = bool(c.freeze.get("cache_prefix", False) and c.freeze.depth > 0)
    return c


def _pretrained_dir(cfg, workdir: Path) -> str:
    if "pretrain" not in cfg:
        return ""
    return str(cfg.pretrain.init.checkpoint or workdir / "pretrain")


def check(cfg, runs: list[Run], workdir: Path) -> None:
    """Every run's config is built, its freeze depth and data checked, before anything trains."""
    for run in runs:
        try:
            c = run_config(cfg, run, workdir)
            for key, values in run.settings.get("choose", {}).items():
                for value in values:
                    config.override(copy.deepcopy(c), key, value)
        except ConfigError as e:
            raise ConfigError(f"sweep run {run.name}: {e}") from None
        name = c.model.name or ("pretrain" in cfg and cfg.pretrain.model.name)
        if name:
            blocks = models.create(name, num_classes=2, **dict(c.model.options)).blocks
            if not 0 <= c.freeze.depth < len(blocks):
                raise ConfigError(
                    f"sweep run {run.name}: freeze.depth={c.freeze.depth} is beyond {name}'s "
                    f"{len(blocks)} blocks ({', '.join(blocks)}): use 0 … {len(blocks) - 1}.")
        data.load_splits(c.data, seed=run.seed)
        if "choose" in run.settings:  # and its validation split
            c.data.holdout = cfg.sweep.holdout
            data.load_splits(c.data, seed=run.seed)


def run_sweep(cfg, workdir: str | Path, only: str | None = None) -> list[dict]:
    """Every run of the sweep (or the one named ``only``, or ``pretrain``), then the outputs
    of all finished runs (``collect``); returns their rows."""
    workdir = Path(workdir)
    runs = plan_runs(cfg)
    chosen = _chosen(runs, only)
    check(cfg, chosen, workdir)
    use_compilation_cache(workdir)
    if only == "pretrain" or _needs_pretraining(cfg, chosen, workdir):
        if only not in (None, "pretrain"):
            raise ConfigError(f"run {only} starts from the pretrained checkpoint, which is not "
                              f"trained yet: run --only pretrain first.")
        pretrain(cfg, workdir)
    for run in chosen:
        _run_once(cfg, run, workdir)
    return collect(cfg, workdir)


def _chosen(runs: list[Run], only: str | None) -> list[Run]:
    if only is None:
        return runs
    if only == "pretrain":
        return []
    chosen = [run for run in runs if run.name == only]
    if not chosen:
        raise ConfigError(f"--only {only}: the sweep has no such run; --list prints its runs.")
    return chosen


def _pretrains(cfg, runs: list[Run]) -> bool:
    """Whether a run starts from ``{pretrain}`` and the sweep trains it."""
    if "pretrain" not in cfg or cfg.pretrain.init.checkpoint:
        return False
    return any("{pretrain}" in str(run.settings.get("init.checkpoint",
                                                  cfg.transfer.init.checkpoint))
               for run in runs)


def _needs_pretraining(cfg, runs: list[Run], workdir: Path) -> bool:
    return _pretrains(cfg, runs) and not (workdir / "pretrain" / RESULT).is_file()


def pretrain(cfg, workdir: Path) -> Path:
    """The checkpoint transfer starts from: ``pretrain.init.checkpoint`` as it is (nothing is
    trained), or else a run of ``cfg.pretrain`` in ``<workdir>/pretrain``."""
    if cfg.pretrain.init.checkpoint:
        return Path(cfg.pretrain.init.checkpoint)
    directory = workdir / "pretrain"
    result = train.train_and_evaluate(cfg.pretrain, directory)
    _write_result(directory, {"test_accuracy": result["test_accuracy"]})
    print(f"pretrained {cfg.pretrain.model.name}: test accuracy "
          f"{result['test_accuracy']:.4f} on {cfg.pretrain.data.name} classes "
          f"{tuple(cfg.pretrain.data.classes) or 'all'}")
    return directory


def use_compilation_cache(workdir: Path) -> None:
    """JAX's persistent compilation cache in ``<workdir>/xla_cache`` unless one is set, for
    every program however fast it compiles."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _run_once(cfg, run: Run, workdir: Path) -> dict:
    """A run's result, read back if it finished before (``result.json``), else trained; a run
    starting from another run of the sweep needs that one finished."""
    directory = workdir / "runs" / run.name
    if (directory / RESULT).is_file():
        return json.loads((directory / RESULT).read_text())
    c = run_config(cfg, run, workdir)
    source = Path(c.init.checkpoint) if c.init.checkpoint else None
    if source and source.parent == workdir / "runs" and not (source / RESULT).is_file():
        raise ConfigError(f"run {run.name} starts from run {source.name}, which has not "
                          f"finished: run --only {source.name} first.")
    chosen = choose(c, run.settings.get("choose", {}), directory, cfg.sweep.holdout)
    for key, value in chosen.items():
        config.override(c, key, value)
    return _trained(c, directory, {f"chosen {k}": v for k, v in chosen.items()})


def choose(c, candidates: dict, directory: Path, holdout: float) -> dict:
    """For each key of ``candidates`` (a point's ``choose``: dotted key → values, in turn),
    the value whose run on a validation split held out of the training examples
    (``data.holdout = holdout``) reaches the best accuracy, the first of a tie; the candidates
    run in ``directory/choose/<key><value>`` (finished ones are read back)."""
    chosen = {}
    for key, values in candidates.items():
        accuracies = []
        for value in values:
            trial = copy.deepcopy(c)
            for k, v in {**chosen, key: value}.items():
                config.override(trial, k, v)
            trial.data.holdout = holdout
            trial.name = f"{c.name} {key}={value}"
            path = directory / "choose" / f"{key.rpartition('.')[2]}{value}"
            done = path / RESULT
            result = (json.loads(done.read_text()) if done.is_file()
                      else _trained(trial, path, {}))
            accuracies.append(result["test_accuracy"])
        chosen[key] = values[accuracies.index(max(accuracies))]
    return chosen


def _trained(c, directory: Path, extra: dict) -> dict:
    """``c`` trained in ``directory``; its result (with ``extra``) written to result.json."""
    result = train.train_and_evaluate(c, directory)
    finished = dict(test_accuracy=result["test_accuracy"], test_loss=result["test_loss"],
                    trainable_params=result["trainable_params"], n_train=result["n_train"],
                    freeze_depth=c.freeze.depth, train_seconds=result["seconds"],
                    compile_seconds=result["compile_seconds"], **extra)
    _write_result(directory, finished)
    return finished


def _write_result(directory: Path, result: dict) -> None:
    if jax.process_index() == 0:
        (directory / RESULT).write_text(json.dumps(result))


def collect(cfg, workdir: str | Path) -> list[dict]:
    """The rows of every finished run, in the sweep's order; writes results.csv, summary.csv,
    summary.md and the plot in ``workdir`` and prints the summary."""
    workdir = Path(workdir)
    rows = []
    for run in plan_runs(cfg):
        done = workdir / "runs" / run.name / RESULT
        if done.is_file():
            rows.append(summary.row(run.name, run.seed, run.settings, json.loads(done.read_text())))
    if jax.process_index() == 0 and rows:
        table = summary.write(rows, workdir, x=cfg.sweep.x, lines=tuple(cfg.sweep.lines),
                              show=tuple(cfg.sweep.show))
        print(table)
    elif jax.process_index() == 0:
        print(f"no run of the sweep has finished in {workdir / 'runs'} yet.")
    return rows


def list_commands(cfg, spec: str, workdir: str | Path) -> list[str]:
    """One command per run (pretraining first where the sweep pretrains), to spread the sweep
    over a job runner; runs that start from another run come after it."""
    runs = plan_runs(cfg)
    names = ["pretrain"] if _pretrains(cfg, runs) else []
    names += [run.name for run in runs]
    return [f"python -m scripts.ablate --config {shlex.quote(spec)} --workdir "
            f"{shlex.quote(str(workdir))} --only {shlex.quote(name)}" for name in names]
