"""scripts.gpu_check --tiny runs on the CPU: its checks pass (the CPU against itself), PyTorch runs
eager on the CPU beside it, and it writes its JSON and markdown."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_gpu_check_runs_on_the_cpu(tmp_path):
    pytest.importorskip("torch", reason="PyTorch (a reference package) is absent")
    pytest.importorskip("timm", reason="timm (a reference package) is absent")
    done = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--tiny", "--out", tmp_path],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [c["model"] for c in result["checks"]] == ["lenet5", "vit_ti16"]
    for check in result["checks"]:
        assert check["logits_pass"] and check["bf16_pass"], check
        assert check["bf16_params_changed"] >= 0.9
    assert [t["model"] for t in result["throughput"]] == ["resnet18", "vit_ti16"]
    for t in result["throughput"]:
        assert t["ours"]["img_s"] > 0 and t["torch"]["img_s"] > 0 and t["ours"]["flops"] > 0
        assert t["torch"]["compiled"] is False  # eager: no CUDA here
        assert t["ours"]["mfu"] is None  # no peak for the CPU
    assert result["pipeline_img_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| lenet5 |" in table and "| vit_ti16 | 4 |" in table
