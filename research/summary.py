"""A sweep's outputs: a row per run, statistics over seeds per grid point, and a plot.

``results.csv`` has a row per finished run: its name, seed, every swept key and label, the
freeze depth it ran at, training examples, test accuracy and loss, trainable parameters, and
seconds (the whole run, and the train step's compilation). ``summary.csv`` and ``summary.md``
have a row per grid point: over its seeds, the test accuracy's mean, standard deviation
(n − 1) and 95% confidence interval (Student's t, ``scipy.stats.t``; none from one seed), and
the means of the rest. The plot draws mean test accuracy against one column (``sweep.x``), a
line per value of ``sweep.lines`` (the regime by default), with the 95% interval as error bars.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from scipy import stats

MEASURED = ("freeze_depth", "n_train", "test_accuracy", "test_loss", "trainable_params",
            "train_seconds", "compile_seconds")
ROUNDING = {"test_accuracy": 4, "test_loss": 4, "train_seconds": 1, "compile_seconds": 2}


def row(name: str, seed: int, labels: dict, result: dict) -> dict:
    """A results.csv row: the run's name and seed, its point's keys, what it measured."""
    measured = {k: round(result[k], ROUNDING[k]) if k in ROUNDING else result[k]
                for k in MEASURED}
    chosen = {k: v for k, v in result.items() if k.startswith("chosen ")}
    return {"run": name, "seed": seed, **{k: _cell(v) for k, v in labels.items()}, **chosen,
            **measured}


def _cell(value):
    return value if isinstance(value, (int, float, str)) else repr(value)


def columns(rows: list[dict]) -> list[str]:
    """``run``, ``seed``, the swept keys in order of appearance, then what was measured."""
    keys = [k for r in rows for k in r if k not in ("run", "seed", *MEASURED)]
    return ["run", "seed", *dict.fromkeys(keys), *MEASURED]


def point_of(row_: dict) -> str:
    return row_["run"].rpartition("_seed")[0]


def summarize(rows: list[dict]) -> list[dict]:
    """A row per grid point (in order of appearance): its keys and, over its seeds, the test
    accuracy's mean, std, 95% interval, and the other measurements' means."""
    keys = [c for c in columns(rows) if c not in ("run", "seed", *MEASURED)]
    points: dict[str, list[dict]] = {}
    for r in rows:
        points.setdefault(point_of(r), []).append(r)
    out = []
    for point, members in points.items():
        acc = np.array([m["test_accuracy"] for m in members], float)
        mean, std = float(acc.mean()), float(acc.std(ddof=1)) if len(acc) > 1 else math.nan
        half = (float(stats.t.ppf(0.975, len(acc) - 1)) * std / math.sqrt(len(acc))
                if len(acc) > 1 else math.nan)
        out.append({"point": point, **{k: members[0].get(k, "") for k in keys},
                    "freeze_depth": members[0]["freeze_depth"],
                    "n_train": members[0]["n_train"], "seeds": len(acc),
                    "test_accuracy_mean": round(mean, 4), "test_accuracy_std": round(std, 4),
                    "test_accuracy_ci95_low": round(mean - half, 4),
                    "test_accuracy_ci95_high": round(mean + half, 4),
                    **{f"{k}_mean": round(float(np.mean([m[k] for m in members])), 4)
                       for k in ("test_loss", "trainable_params", "train_seconds",
                                 "compile_seconds")}})
    return out


def markdown(points: list[dict]) -> str:
    """summary.md's table: a grid point a line, accuracy as mean ± std [95% interval]."""
    keys = [k for k in points[0] if k not in ("point", "seeds") and not k.startswith("test_")
            and not k.endswith("_mean")]
    head = ["point", *keys, "seeds", "test accuracy: mean ± std [95% CI]", "test loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        acc = f"{p['test_accuracy_mean']:.4f}"
        if p["seeds"] > 1:
            acc += (f" ± {p['test_accuracy_std']:.4f} [{p['test_accuracy_ci95_low']:.4f}, "
                    f"{p['test_accuracy_ci95_high']:.4f}]")
        cells = [p["point"], *(str(p[k]) for k in keys), str(p["seeds"]), acc,
                 f"{p['test_loss_mean']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], workdir: Path, x: str = "freeze_depth",
          lines: tuple[str, ...] = ("regime",), show: tuple[str, ...] = ()) -> str:
    """results.csv, summary.csv, summary.md and ``accuracy_vs_<x>.png`` in ``workdir``;
    returns summary.md's table."""
    _write_csv(workdir / "results.csv", rows, columns(rows))
    points = summarize(rows)
    _write_csv(workdir / "summary.csv", points, list(points[0]))
    table = markdown(points)
    (workdir / "summary.md").write_text(table)
    plot(points, rows, workdir / f"accuracy_vs_{x}.png", x, lines, show)
    return table


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot(points: list[dict], rows: list[dict], path: Path, x: str, lines: tuple[str, ...],
         show: tuple[str, ...] = ()) -> None:
    """Mean test accuracy against ``x``, a line per value of the ``lines`` columns (those
    labelled in ``show``, or all), 95% intervals as error bars (a line measured at one x only is
    drawn as a marker), and every run as a dot of its line's colour (Yosinski et al.'s Figure 2
    draws its networks so)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for p in points:
        if not show or _line(p, lines) in show:
            groups.setdefault(_line(p, lines), []).append(p)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, members in groups.items():
        xs = sorted({float(m[x]) for m in members})
        means = [np.mean([m["test_accuracy_mean"] for m in members if float(m[x]) == v])
                 for v in xs]
        errors = [np.nan_to_num(np.mean([m["test_accuracy_ci95_high"] - m["test_accuracy_mean"]
                                         for m in members if float(m[x]) == v])) for v in xs]
        drawn = ax.errorbar(xs, means, yerr=errors, marker="o" if len(xs) > 1 else "s",
                            linestyle="-" if len(xs) > 1 else "none", capsize=3, label=label)
        runs = [r for r in rows if _line(r, lines) == label]
        ax.scatter([float(r[x]) for r in runs], [r["test_accuracy"] for r in runs], s=8,
                   alpha=0.5, color=drawn.lines[0].get_color())
    ticks = sorted({float(p[x]) for members in groups.values() for p in members})
    if len(ticks) <= 12 and all(t.is_integer() for t in ticks):
        ax.set_xticks(ticks)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _line(record: dict, lines: tuple[str, ...]) -> str:
    """The plot line of a run or grid point: its values of the ``lines`` columns."""
    return ", ".join(str(record[k]) for k in lines if record.get(k, "") != "") or "runs"
