"""Ablations of transfer: from scratch, linear probe, and fine-tuning at every freeze depth.

An ablation config has ``pretrain`` (a training config, run once into ``<workdir>/pretrain``
unless ``init.checkpoint`` names existing weights), ``transfer`` (the training config of every
transfer run, which starts from the pretrained checkpoint) and ``ablation`` (``seeds``,
``depths``: a tuple, or empty for 0 … all-but-head, ``regimes``, and ``probe_lr``, the linear
probe's learning rate if it differs). Every run has its own workdir, so an interrupted ablation
resumes where it stopped and repeats nothing.

The ``linear_probe`` regime is a transfer run with every block but the head frozen; with
``transfer.freeze.cache_prefix`` it trains the head on features computed once
(``research.prefix_cache``): the result of recomputing them every step, to float32 rounding.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

import models
from research import train
from research.errors import ConfigError

COLUMNS = ("regime", "freeze_depth", "seed", "n_train", "test_accuracy", "trainable_params",
           "seconds")
REGIMES = ("scratch", "linear_probe", "finetune")


@dataclasses.dataclass(frozen=True)
class Run:
    regime: str
    freeze_depth: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.regime}_depth{self.freeze_depth}_seed{self.seed}"


def plan_runs(cfg, num_blocks: int) -> list[Run]:
    unknown = set(cfg.ablation.regimes) - set(REGIMES)
    if unknown:
        raise ConfigError(f"ablation.regimes has {sorted(unknown)}; use any of {REGIMES}.")
    probe_depth = num_blocks - 1
    depths = tuple(cfg.ablation.depths) or tuple(range(probe_depth + 1))
    bad = [d for d in depths if not 0 <= d <= probe_depth]
    if bad:
        raise ConfigError(f"ablation.depths {bad} are outside 0…{probe_depth} (the model has "
                          f"{num_blocks} blocks).")
    runs = []
    for seed in cfg.ablation.seeds:
        for regime in cfg.ablation.regimes:
            if regime == "scratch":
                runs.append(Run(regime, 0, seed))
            elif regime == "linear_probe":
                runs.append(Run(regime, probe_depth, seed))
            else:
                runs += [Run(regime, d, seed) for d in depths if d != probe_depth
                         or "linear_probe" not in cfg.ablation.regimes]
    return runs


def run_config(cfg, run: Run, pretrained_dir: Path):
    c = copy.deepcopy(cfg.transfer)
    c.name = run.name
    c.train.seed = run.seed
    c.freeze.depth = run.freeze_depth
    c.freeze.cache_prefix = c.freeze.get("cache_prefix", False) and run.freeze_depth > 0
    if run.regime == "scratch":
        c.init.checkpoint = ""
        c.model.name = cfg.pretrain.model.name
    else:
        c.init.checkpoint = str(pretrained_dir)
    if run.regime == "linear_probe" and cfg.ablation.get("probe_lr"):
        c.optim.lr = cfg.ablation.probe_lr
    return c


def pretrain(cfg, workdir: Path) -> Path:
    """The checkpoint transfer starts from: ``pretrain.init.checkpoint`` as it is (nothing is
    trained), or else a run of ``cfg.pretrain`` in ``<workdir>/pretrain``."""
    if cfg.pretrain.init.checkpoint:
        return Path(cfg.pretrain.init.checkpoint)
    directory = workdir / "pretrain"
    result = train.train_and_evaluate(cfg.pretrain, directory)
    print(f"pretrained {cfg.pretrain.model.name}: test accuracy "
          f"{result['test_accuracy']:.4f} on {cfg.pretrain.data.name} classes "
          f"{tuple(cfg.pretrain.data.classes) or 'all'}")
    return directory


def run_ablation(cfg, workdir: str | Path) -> list[dict]:
    """Pretrain once, then every run of the plan; writes results.csv and the plot."""
    workdir = Path(workdir)
    runs = plan_runs(cfg, _num_blocks(cfg))
    pretrained_dir = pretrain(cfg, workdir)
    rows = [_row(run, _run_once(cfg, run, pretrained_dir, workdir / "runs" / run.name))
            for run in runs]
    write_results(rows, workdir)
    print(format_table(rows))
    return rows


def _num_blocks(cfg) -> int:
    model = models.create(cfg.pretrain.model.name, num_classes=2,
                          **dict(cfg.pretrain.model.options))
    return len(model.blocks)


def _run_once(cfg, run: Run, pretrained_dir: Path, directory: Path) -> dict:
    """A run's result, read back if it finished before (``result.json``), else trained."""
    done = directory / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    result = train.train_and_evaluate(run_config(cfg, run, pretrained_dir), directory)
    summary = {k: result[k] for k in ("test_accuracy", "trainable_params", "seconds")}
    summary["n_train"] = result["n_train"]
    if jax.process_index() == 0:
        done.write_text(json.dumps(summary))
    return summary


def _row(run: Run, result: dict) -> dict:
    return dict(regime=run.regime, freeze_depth=run.freeze_depth, seed=run.seed,
                n_train=result["n_train"], test_accuracy=round(result["test_accuracy"], 4),
                trainable_params=result["trainable_params"], seconds=round(result["seconds"], 1))


def write_results(rows: list[dict], workdir: Path) -> None:
    if jax.process_index() != 0:
        return
    with open(workdir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, workdir / "accuracy_vs_freeze_depth.png")


def format_table(rows: list[dict]) -> str:
    table = Table(*COLUMNS, title="transfer results")
    for row in rows:
        table.add_row(*(str(row[c]) for c in COLUMNS))
    console = Console(width=120, record=True, force_terminal=False)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    finetune = [r for r in rows if r["regime"] == "finetune"]
    depths = sorted({r["freeze_depth"] for r in finetune})
    if depths:
        accs = [[r["test_accuracy"] for r in finetune if r["freeze_depth"] == d] for d in depths]
        ax.errorbar(depths, [np.mean(a) for a in accs], yerr=[np.std(a) for a in accs],
                    marker="o", capsize=3, label="fine-tune (first n blocks frozen)")
    for regime, style in (("linear_probe", "s"), ("scratch", "x")):
        points = [r for r in rows if r["regime"] == regime]
        if points:
            ax.scatter([r["freeze_depth"] for r in points], [r["test_accuracy"] for r in points],
                       marker=style, s=60, label=regime.replace("_", " "), zorder=3)
    ax.set_xticks(sorted({r["freeze_depth"] for r in rows}))
    ax.set_xlabel("freeze depth (blocks frozen)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
