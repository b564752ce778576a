"""research.ablate's sweeps: a grid of dotted keys × seeds, run by run; a sweep stopped mid-way
and started again repeats no finished run and writes the results an uninterrupted one does;
--list, --only and --collect; bad sweeps refused before any run; the statistics and events."""

import csv
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from tensorboardX.proto import event_pb2

from research import ablate, config, summary, train
from research.errors import ConfigError, DataError
from scripts import ablate as ablate_script

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = ("train_seconds", "compile_seconds")


def yosinski(tfds_dir, arg="ns=(4,)"):
    """Yosinski's protocol reduced, at one n: baseA, baseB, BnB, BnB+, AnB, AnB+."""
    return config.load(f"{ROOT}/configs/yosinski.py:reduced=True,{arg},"
                       f"transfer.data.tfds_dir={tfds_dir}")


def read_csv(path: Path, without=()) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in without} for r in csv.DictReader(f)]


def files_and_mtimes(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tfds_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    ablate.run_sweep(yosinski(tfds_dir), workdir)
    return workdir


@pytest.fixture(scope="module")
def restarted(tfds_dir, tmp_path_factory):
    """The sweep's first three runs (baseA, baseB, BnB) stopped in the third (two steps in),
    then started again; the files of the two runs finished before the stop, as they were."""
    workdir = tmp_path_factory.mktemp("restarted")
    cfg, real = yosinski(tfds_dir), train.train_and_evaluate
    cfg.sweep.grid = cfg.sweep.grid[:3]
    calls = []

    def stopping(c, directory, **kwargs):
        calls.append(directory)
        if len(calls) == 3:
            real(c, directory, stop_after=2)
            raise Stop
        return real(c, directory, **kwargs)

    train.train_and_evaluate = stopping
    try:
        with pytest.raises(Stop):
            ablate.run_sweep(cfg, workdir)
    finally:
        train.train_and_evaluate = real
    finished = files_and_mtimes(calls[0]) | files_and_mtimes(calls[1])
    assert not (calls[2] / ablate.RESULT).exists() and (calls[2] / "checkpoints").is_dir()
    ablate.run_sweep(cfg, workdir)
    return workdir, finished


@pytest.mark.slow
def test_a_restarted_sweep_repeats_no_finished_run_and_writes_the_same_results(
        uninterrupted, restarted):
    workdir, finished = restarted
    after = files_and_mtimes(workdir / "runs")
    assert {p: after[p] for p in finished} == finished
    assert read_csv(workdir / "results.csv", TIMINGS) == read_csv(
        uninterrupted / "results.csv", TIMINGS)[:3]


@pytest.mark.slow
def test_yosinski_runs_its_protocol_and_plots_figure_2(uninterrupted):
    rows = read_csv(uninterrupted / "results.csv")
    assert [r["regime"] for r in rows] == ["baseA", "baseB", "BnB", "BnB+", "AnB", "AnB+"]
    assert list(rows[0])[:4] == ["run", "seed", "regime", "n"]
    assert {"data.classes", "init.dont_load", "freeze.depth", "test_loss", *TIMINGS} <= set(rows[0])
    frozen = {r["regime"]: int(r["trainable_params"]) for r in rows}
    assert frozen["BnB"] == frozen["AnB"] < frozen["BnB+"] == frozen["AnB+"] == frozen["baseB"]
    assert all(float(r["compile_seconds"]) > 0 for r in rows)
    assert all(float(r["test_accuracy"]) > 0 for r in rows)
    assert (uninterrupted / "accuracy_vs_n.png").stat().st_size > 10_000
    assert "| BnB_n4_depth4 | BnB | 4 |" in (uninterrupted / "summary.md").read_text()


@pytest.mark.slow
def test_a_transferred_run_starts_from_its_source_run(uninterrupted):
    """AnB's frozen blocks are baseA's, bit for bit; the blocks above are not."""
    from research import pretrained, tree
    base = tree.flatten(pretrained.load(uninterrupted / "runs" / "baseA_n0_seed0")
                        .variables["params"])
    anb = tree.flatten(pretrained.load(uninterrupted / "runs" / "AnB_n4_depth4_seed0")
                       .variables["params"])
    for path in base:
        if not path.startswith("head/"):
            np.testing.assert_array_equal(anb[path], base[path], err_msg=path)
    assert not np.array_equal(anb["head/kernel"], base["head/kernel"])


@pytest.mark.slow
def test_every_run_writes_tensorboard_events_equal_to_its_metrics(uninterrupted):
    run = uninterrupted / "runs" / "BnB+_n4_depth0_seed0"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    scalars = {v.tag: v.simple_value for path in run.glob("events.out.tfevents.*")
               for event in events(path) for v in event.summary.value}
    assert scalars["test_accuracy"] == pytest.approx(last["test_accuracy"])
    assert scalars["train_loss"] == pytest.approx(last["train_loss"])


def events(path: Path):
    """The records of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    data, at = path.read_bytes(), 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        yield event_pb2.Event.FromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4


@pytest.mark.slow
def test_only_runs_one_run_and_collect_writes_what_finished(uninterrupted, tfds_dir, tmp_path):
    cfg = yosinski(tfds_dir)
    with pytest.raises(ConfigError, match="run --only baseA_n0_seed0 first"):
        ablate.run_sweep(cfg, tmp_path, only="AnB_n4_depth4_seed0")
    rows = ablate.run_sweep(cfg, tmp_path, only="baseA_n0_seed0")
    assert [r["run"] for r in rows] == ["baseA_n0_seed0"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["baseA_n0_seed0"]
    before = read_csv(uninterrupted / "results.csv")
    (uninterrupted / "results.csv").unlink()
    assert ablate.collect(cfg, uninterrupted) and read_csv(uninterrupted / "results.csv") == before


def test_list_prints_one_command_per_run_pretraining_first(tmp_path, monkeypatch, capsys):
    spec = f"{ROOT}/configs/quickstart.py:seeds=2,depths=(1,)"
    monkeypatch.setattr(sys, "argv", ["ablate", "--config", spec, "--workdir", str(tmp_path),
                                      "--list"])
    ablate_script.main()
    out = capsys.readouterr().out.splitlines()
    names = [line.rpartition("--only ")[2] for line in out]
    runs = ablate.plan_runs(config.load(spec))
    assert names == ["pretrain"] + [r.name for r in runs] and len(runs) == 6
    assert all(f"--workdir {tmp_path} " in line for line in out)
    assert not list(tmp_path.iterdir())


def test_grids_are_products_of_dotted_keys_and_every_point_runs_per_seed():
    grid = ablate.product(ablate.axis("optim.lr", (0.1, 0.01)),
                          ablate.axis("freeze.depth", (0, 2)))
    assert grid == ({"optim.lr": 0.1, "freeze.depth": 0}, {"optim.lr": 0.1, "freeze.depth": 2},
                    {"optim.lr": 0.01, "freeze.depth": 0}, {"optim.lr": 0.01, "freeze.depth": 2})
    cfg = config.load(f"{ROOT}/configs/quickstart.py:sweep.seeds=(3,4)")
    cfg.sweep.grid = grid
    runs = ablate.plan_runs(cfg)
    assert [r.name for r in runs][:3] == ["lr0.1_depth0_seed3", "lr0.1_depth0_seed4",
                                          "lr0.1_depth2_seed3"]
    c = ablate.run_config(cfg, runs[3], Path("/w"))
    assert (c.optim.lr, c.freeze.depth, c.train.seed) == (0.1, 2, 4)
    unfrozen = ablate.run_config(cfg, runs[0], Path("/w"))
    assert c.freeze.cache_prefix and not unfrozen.freeze.cache_prefix  # nothing frozen to cache
    assert c.init.checkpoint == "/w/pretrain"


@pytest.mark.parametrize("arg, error, message", [
    ("regimes=()", ConfigError, "the sweep is empty"),
    ("sweep.seeds=()", ConfigError, "the sweep is empty"),
    ("depths=(1,5)", ConfigError, r"finetune_depth5_seed0: freeze.depth=5 is beyond resnet_small"),
])
def test_bad_quickstart_sweeps_stop_before_any_run(tfds_dir, tmp_path, arg, error, message):
    cfg = config.load(f"{ROOT}/configs/quickstart.py:{arg},transfer.data.tfds_dir={tfds_dir}")
    with pytest.raises(error, match=message):
        ablate.run_sweep(cfg, tmp_path)
    assert not list(tmp_path.iterdir())


def test_unknown_sweep_keys_and_twin_points_stop_before_any_run(tfds_dir, tmp_path):
    cfg = config.load(f"{ROOT}/configs/quickstart.py:transfer.data.tfds_dir={tfds_dir}")
    cfg.sweep.grid = ({"optim.lrr": 0.1},)
    with pytest.raises(ConfigError, match="sweep run lrr0.1_seed0: unknown config key 'optim.lrr'"
                                          ": optim has no 'lrr'. Did you mean lr"):
        ablate.run_sweep(cfg, tmp_path)
    cfg.sweep.grid = ({"optim.lr": 0.1, "init.checkpoint": "a"}, {"optim.lr": 0.1})
    with pytest.raises(ConfigError, match=r"share the names \['lr0.1_seed0'\]"):
        ablate.run_sweep(cfg, tmp_path)
    assert not list(tmp_path.iterdir())


def test_yosinski_halves_must_be_disjoint_and_exist(tfds_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"halves a=\(0, 1\) and b=\(1, 2\) must be disjoint"):
        yosinski(tfds_dir, "a=(0,1),b=(1,2)")
    with pytest.raises(DataError, match=r"classes \[12\] that fashion_mnist does not have"):
        ablate.run_sweep(yosinski(tfds_dir, "a=(0,12),b=(1,2)"), tmp_path)
    assert not list(tmp_path.iterdir())


def test_summary_has_students_t_intervals_over_seeds(tmp_path):
    accuracies = {"a": [0.5, 0.6, 0.7], "b": [0.9]}
    rows = [summary.row(f"{point}_seed{seed}", seed, {"regime": point, "freeze.depth": 1},
                        dict(freeze_depth=1, n_train=10, test_accuracy=acc, test_loss=1.0,
                             trainable_params=5, train_seconds=1.0, compile_seconds=0.5))
            for point, accs in accuracies.items() for seed, acc in enumerate(accs)]
    table = summary.write(rows, tmp_path)
    points = read_csv(tmp_path / "summary.csv")
    a, b = points
    mean, std = np.mean(accuracies["a"]), np.std(accuracies["a"], ddof=1)
    low, high = stats.t.interval(0.95, 2, loc=mean, scale=std / math.sqrt(3))
    assert (a["point"], int(a["seeds"])) == ("a", 3) and (b["point"], int(b["seeds"])) == ("b", 1)
    assert float(a["test_accuracy_mean"]) == pytest.approx(mean, abs=1e-4)
    assert float(a["test_accuracy_std"]) == pytest.approx(std, abs=1e-4)
    assert float(a["test_accuracy_ci95_low"]) == pytest.approx(low, abs=1e-4)
    assert float(a["test_accuracy_ci95_high"]) == pytest.approx(high, abs=1e-4)
    assert math.isnan(float(b["test_accuracy_std"]))
    assert f"{mean:.4f} ± {std:.4f} [{low:.4f}, {high:.4f}]" in table
    assert len(read_csv(tmp_path / "results.csv")) == 4
    assert (tmp_path / "accuracy_vs_freeze_depth.png").stat().st_size > 10_000


@pytest.mark.slow
def test_kornblith_compares_logistic_regression_fine_tuning_and_scratch(tfds_dir, tmp_path):
    cfg = config.load(f"{ROOT}/configs/kornblith.py:reduced=True,"
                      f"pretrain.data.tfds_dir={tfds_dir},transfer.data.tfds_dir={tfds_dir}")
    ablate.run_sweep(cfg, tmp_path)
    rows = {r["regime"]: r for r in read_csv(tmp_path / "results.csv")}
    assert list(rows) == ["logistic", "finetune", "scratch"]
    assert {int(r["n_train"]) for r in rows.values()} == {100}
    assert int(rows["logistic"]["trainable_params"]) == 64 * 10 + 10  # the head alone
    assert int(rows["finetune"]["trainable_params"]) == int(rows["scratch"]["trainable_params"])
    trials = sorted((tmp_path / "runs" / rows["logistic"]["run"] / "choose").iterdir())
    validation = [json.loads((t / ablate.RESULT).read_text()) for t in trials]
    assert [t.name for t in trials] == ["weight_decay0.0", "weight_decay0.01"]
    assert all(v["n_train"] == 80 for v in validation)  # a fifth held out for validation
    best = max(validation, key=lambda v: v["test_accuracy"])
    assert float(rows["logistic"]["chosen optim.weight_decay"]) == float(
        trials[validation.index(best)].name.removeprefix("weight_decay"))
    assert (tmp_path / "accuracy_vs_n_train.png").is_file()


def test_holdout_is_a_stratified_validation_split_of_the_training_examples(make_config):
    from research import data
    cfg = make_config("fashion_mnist.py", "data.name='digits',data.per_class=10,data.holdout=0.2")
    train_split, validation = data.load_splits(cfg.data, seed=0)
    whole, _ = data.load_splits(make_config("fashion_mnist.py",
                                            "data.name='digits',data.per_class=10").data, seed=0)
    assert (len(train_split), len(validation)) == (80, 20)
    assert sorted([*train_split.indices, *validation.indices]) == sorted(whole.indices)
    assert np.bincount(validation.labels).tolist() == [2] * 10
    cfg.data.per_class = 1
    with pytest.raises(DataError, match="data.holdout=0.2 cannot hold out"):
        data.load_splits(cfg.data, seed=0)
