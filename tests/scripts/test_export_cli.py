"""scripts.export writes a run's steps as jax.export modules with their inputs beside them; read
back and called on the CPU, they compute what research.train's steps compute."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from research import data, export, train

ROOT = Path(__file__).resolve().parents[2]


def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "scripts.export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, tfds_dir):
    from research import config
    workdir = tmp_path_factory.mktemp("run")
    cfg = config.load(f"configs/fashion_mnist.py:data.tfds_dir={tfds_dir},train.progress=False,"
                      "data.name=digits,data.mean=None,data.std=None,data.per_class=8,"
                      "optim.schedule=constant,train.batch_size=40,train.eval_batch_size=48,"
                      "train.epochs=1.0")
    train.train_and_evaluate(cfg, workdir)
    done = export_cli("--workdir", workdir, "--platforms", "cpu,cuda")
    assert done.returncode == 0, done.stderr
    return workdir


def test_export_writes_each_step_per_platform_and_the_inputs(exported_run):
    files = {p.name for p in (exported_run / "export").iterdir()}
    assert files == {"eval.cpu.bin", "train.cpu.bin", "eval.cuda.bin", "train.cuda.bin",
                     "variables.safetensors", "train_state.safetensors", "export.json"}
    info = json.loads((exported_run / "export" / "export.json").read_text())
    assert info["platforms"] == ["cpu", "cuda"] and info["step"] == 2
    assert info["image_shape"] == [8, 8, 1] and info["model"]["name"] == "resnet_small"
    for name in ("eval", "train"):
        on_gpu = export.load(exported_run / "export" / f"{name}.cuda.bin")
        assert on_gpu.platforms == ("cuda",) and export.cpu_only_calls(on_gpu) == set()


def test_exported_steps_called_on_the_cpu_equal_the_run_steps(exported_run):
    exp, state = export.from_run(exported_run)
    out = exported_run / "export"
    images, labels, mask = next(data.eval_batches(exp.test_split, exp.cfg.train.eval_batch_size))
    mask = mask.astype(np.float32)
    expected = train.make_eval_step(exp)(state.variables(), images, labels, mask)
    got = export.load(out / "eval.cpu.bin").call(
        export.load_arrays(out / export.VARIABLES_FILE), images, labels, mask)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)

    b = exp.cfg.train.batch_size
    images, labels = images[:b], labels[:b]
    arrays = export.load_arrays(out / export.TRAIN_STATE_FILE)
    got_state, got_metrics = export.load(out / "train.cpu.bin").call(arrays, images, labels)
    expected_state, expected_metrics = train.make_train_step(exp)(state, images, labels)
    np.testing.assert_allclose(got_metrics["loss"], expected_metrics["loss"], rtol=1e-4)
    expected_state = export.flat(jax.device_get(expected_state))
    assert set(got_state) == set(expected_state) == set(arrays)
    for path, value in expected_state.items():
        np.testing.assert_allclose(got_state[path], value, rtol=1e-4, atol=1e-5, err_msg=path)
    assert not np.allclose(got_state["params/head/kernel"], arrays["params/head/kernel"])


def test_an_unknown_platform_is_one_line_and_writes_nothing(tmp_path):
    done = export_cli("--workdir", tmp_path, "--platforms", "cuda,gpu")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "'gpu'" in done.stderr
    assert not (tmp_path / "export").exists()
