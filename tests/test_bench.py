import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_runs_in_quick_mode(tmp_path):
    pytest.importorskip("torch", reason="the benchmark's peer is PyTorch")
    defaults = {k: v for k, v in os.environ.items() if k != "TRANSFERLAB_ONEDNN_WINOGRAD"}
    done = subprocess.run([sys.executable, "-m", "scripts.bench", "--quick", "--out", tmp_path],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800, env=defaults)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    whats = {(r["model"], r["what"]) for r in records}
    assert ("resnet18", "train step") in whats and ("resnet18", "inference step") in whats
    train = next(r for r in records if r["what"] == "train step")
    assert train["ours"] > 0 and train["peer"] > 0
    assert train["ratio"] == train["ours"] / train["peer"]
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
    assert "| resnet18 | train step |" in (tmp_path / "bench.md").read_text()
