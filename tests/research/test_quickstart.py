import csv
import shutil
from pathlib import Path

import pytest

from research import ablate, config

ROOT = Path(__file__).resolve().parents[2]


def quickstart(tfds_dir, arg):
    return config.load(f"{ROOT}/configs/quickstart.py:{arg},pretrain.data.tfds_dir={tfds_dir},"
                       f"transfer.data.tfds_dir={tfds_dir}")


@pytest.mark.slow
def test_quickstart_end_to_end_on_a_reduced_config(tfds_dir, tmp_path):
    cfg = quickstart(tfds_dir, "reduced=True")
    rows = ablate.run_sweep(cfg, tmp_path)
    with open(tmp_path / "results.csv") as f:
        written = list(csv.DictReader(f))
    assert list(written[0])[:3] == ["run", "seed", "regime"]
    regimes = [(r["regime"], int(r["freeze_depth"])) for r in written]
    assert regimes == [("scratch", 0), ("linear_probe", 4), ("finetune", 0), ("finetune", 1),
                       ("finetune", 2), ("finetune", 3)]
    assert all(int(r["n_train"]) == 100 for r in written)
    trainable = [int(r["trainable_params"]) for r in written[2:]] + [int(written[1]["trainable_params"])]
    assert trainable == sorted(trainable, reverse=True) and trainable[-1] == 64 * 5 + 5
    assert all(float(r["test_accuracy"]) > CHANCE + 0.1 for r in written)  # 5 classes
    assert (tmp_path / "accuracy_vs_freeze_depth.png").stat().st_size > 10_000
    assert (tmp_path / "summary.md").read_text().count("\n") == 2 + len(written)
    # Finished runs are read back untouched, a deleted one is retrained: the same seed, the
    # same table.
    shutil.rmtree(tmp_path / "runs" / "finetune_depth2_seed0")
    kept = files_and_mtimes(tmp_path / "runs") | files_and_mtimes(tmp_path / "pretrain")
    again = ablate.run_sweep(cfg, tmp_path)
    after = files_and_mtimes(tmp_path / "runs") | files_and_mtimes(tmp_path / "pretrain")
    assert {path: after[path] for path in kept} == kept  # nothing finished was rewritten
    retrained = [p for p in after if p not in kept]
    assert retrained and all("finetune_depth2_seed0" in p for p in retrained)
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]


CHANCE = 1 / 5


def files_and_mtimes(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_ablation_depths_outside_the_model_are_refused(tfds_dir, tmp_path):
    cfg = quickstart(tfds_dir, "depths=(0,7)")
    with pytest.raises(ablate.ConfigError, match=r"freeze.depth=7 is beyond resnet_small"):
        ablate.check(cfg, ablate.plan_runs(cfg), tmp_path)
