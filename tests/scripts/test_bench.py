import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from models.cpu import process
from scripts import bench

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_runs_in_quick_mode(tmp_path):
    pytest.importorskip("torch", reason="the benchmark's peer is PyTorch")
    defaults = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFERLAB_")}
    done = subprocess.run([sys.executable, "-m", "scripts.bench", "--quick", "--rounds", "2",
                           "--out", tmp_path],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800, env=defaults)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    whats = {(r["model"], r["what"]) for r in records}
    assert ("resnet18", "train step") in whats and ("resnet18", "inference step") in whats
    train = next(r for r in records if r["what"] == "train step")
    assert train["ours"] > 0 and train["peer"] > 0
    assert len(train["round_ratios"]) == 2 and train["ratio"] == pytest.approx(
        sum(train["round_ratios"]) / 2, abs=1e-3)  # the median of two rounds
    assert train["peer_glibc_defaults"] > 0 and 0 < train["ours_of_bound"] < 2
    peak = next(r for r in records if r["model"] == "machine")
    assert peak["unit"] == "GFLOP/s" and peak["ours"] > 1 and peak["peer"] > 1
    sweep = [r for r in records if r["what"].startswith("train, freeze depth")]
    depths = [r for r in sweep if "cached" not in r["what"]]
    cached = [r for r in sweep if r["what"].endswith("cached prefix")]
    assert len(depths) == 6 and depths[0]["flops"] > depths[-1]["flops"]
    assert len(cached) == 5 and all(r["prefix_s_per_image"] > 0 for r in cached)
    assert all(c["flops"] < d["flops"] for c, d in zip(cached, depths[1:]))
    assert all(r["speedup"] == r["ours"] / r["full_img_s"] for r in sweep[1:])
    probe = next(r for r in records if r["what"] == "linear probe: cached vs recompute")
    assert probe["ours"] == cached[-1]["ours"] / depths[-1]["ours"]
    assert "| resnet18 | train step |" in (tmp_path / "bench.md").read_text()
    if process.libc_version().startswith("glibc"):  # both sides opted in to the buffer cache
        assert json.loads((tmp_path / "bench.json").read_text())["environment"]["buffer_cache"]
        assert "and the buffer cache for both" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--models", "resnet18,resnt50"], "--models: unknown model 'resnt50'. Did you mean resnet50"),
    (["--models", "alexnet"], "no PyTorch peer for alexnet"),
    (["--freeze_model", "none"], "--freeze_model '' leaves the freeze sweep out"),
    (["--rounds", "0"], "give at least 1"),
])
def test_benchmark_rejects_bad_arguments_before_measuring(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "scripts.bench", *args, "--out", tmp_path],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and message in done.stderr
    assert not (tmp_path / "bench.json").exists()  # nothing ran, nothing half-written


@pytest.mark.parametrize("model", bench.SMALL_MODELS)
def test_the_small_models_peers_have_our_parameters(model):
    torch = pytest.importorskip("torch", reason="the benchmark's peers are PyTorch's")
    pytest.importorskip("torchvision", reason="the peers are built from torchvision's blocks")
    import models
    ours = models.init_variables(models.create(model, num_classes=1000, in_chans=3),
                                 jax.random.key(0), 32)["params"]
    peer = bench.torch_model(model)
    assert sum(p.numel() for p in peer.parameters()) == sum(v.size for v in jax.tree.leaves(ours))
    assert peer(torch.zeros(2, 3, 32, 32)).shape == (2, 1000)


FAILING_AFTER_THE_MATMUL = """
import sys
from scripts import bench

def measure_interleaved(specs, turn_steps=2):
    if specs[0][0] != "peer_matmul":
        raise RuntimeError("peer_train{...} failed")
    return [dict(gflop_s=200.0), dict(gflop_s=100.0)]

bench.measure_interleaved = measure_interleaved
sys.argv = ["bench", "--models", "resnet18", "--out", sys.argv[1]]
bench.main()
"""


def test_benchmark_keeps_what_it_measured_before_a_failure(tmp_path):
    done = subprocess.run([sys.executable, "-c", FAILING_AFTER_THE_MATMUL, tmp_path], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "peer_train{...} failed" in done.stderr
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert [(r["model"], r["ours"], r["peer"]) for r in records] == [("machine", 100.0, 200.0)]
    assert "| machine | float32 matmul" in (tmp_path / "bench.md").read_text()


def test_a_measurement_runs_with_and_without_the_process_settings():
    from scripts import bench
    for glibc_defaults in (False, True):
        assert bench.measure("ours_matmul", glibc_defaults, steps=1)["gflop_s"] > 0


def test_jpeg_pipeline_measures_decoded_augmented_batches():
    from scripts import bench
    result = bench.ours_jpeg_pipeline(workers=0, batch=4, steps=2, size=64)
    assert result["img_s"] > 0 and result["img_s_per_core"] > 0 and result["peak_mb"] > 0
