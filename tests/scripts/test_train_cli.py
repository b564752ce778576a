"""scripts.train killed (SIGKILL), stopped (SIGTERM, SIGINT) and rerun ends bit-identical to an
uninterrupted run; a stop saves its step and says so in one line."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from research import checkpoints, train

ROOT = Path(__file__).resolve().parents[2]
# 30 steps, every second one checkpointed: a kill lands in a step or in a save.
OVERRIDES = ("data.name='digits',data.mean=(32.0,),data.std=(48.0,),model.name='lenet5',"
             "data.per_class=40,train.batch_size=40,train.epochs=3.0,"
             "train.checkpoint_every_epochs=0.2,train.eval_every_epochs=1.0")
TOTAL_STEPS = 30


def start(tfds_dir, workdir) -> subprocess.Popen:
    config = (f"{ROOT}/configs/fashion_mnist.py:data.tfds_dir={tfds_dir},train.progress=False,"
              f"{OVERRIDES}")
    return subprocess.Popen([sys.executable, "-m", "scripts.train", "--config", config,
                             "--workdir", str(workdir)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def latest(workdir) -> int:
    return checkpoints.latest_step(workdir / "checkpoints") or 0


def signal_at(proc, workdir, step: int, signum: int) -> tuple[str, str]:
    """Send ``signum`` once ``workdir`` holds checkpoint ``step``; the run's output."""
    while latest(workdir) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
        time.sleep(0.01)
    proc.send_signal(signum)
    return proc.communicate(timeout=300)


def leaves(workdir) -> list:
    """Every array of the latest step: parameters, statistics, optimizer state, step, RNG."""
    step_dir = workdir / "checkpoints" / str(latest(workdir))
    return [leaf for item in ("variables", "train_state")
            for leaf in jax.tree.leaves(ocp.StandardCheckpointer().restore(step_dir / item))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tfds_dir):
    from research import config
    workdir = tmp_path_factory.mktemp("uninterrupted")
    cfg = config.load(f"configs/fashion_mnist.py:data.tfds_dir={tfds_dir},"
                      f"train.progress=False,{OVERRIDES}")
    assert train.train_and_evaluate(cfg, workdir)["step"] == TOTAL_STEPS
    return leaves(workdir)


def assert_bit_identical(workdir, expected, note):
    assert latest(workdir) == TOTAL_STEPS, note
    got = leaves(workdir)
    assert len(got) == len(expected), note
    for a, b in zip(got, expected):
        assert np.array_equal(a, b), note


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_rerun_is_bit_identical(uninterrupted, tfds_dir, tmp_path):
    step = random.Random(os.urandom(8)).randrange(1, TOTAL_STEPS - 5)
    signal_at(start(tfds_dir, tmp_path), tmp_path, step, signal.SIGKILL)
    rerun = start(tfds_dir, tmp_path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert_bit_identical(tmp_path, uninterrupted, f"killed at checkpoint {step}")


@pytest.mark.slow
def test_sigterm_and_sigint_save_their_step_say_so_and_the_rerun_is_bit_identical(
        uninterrupted, tfds_dir, tmp_path):
    rng, chosen = random.Random(os.urandom(8)), []
    for signum, status, last in ((signal.SIGTERM, 143, TOTAL_STEPS // 2), (signal.SIGINT, 130,
                                                                         TOTAL_STEPS - 4)):
        step = rng.randrange(latest(tmp_path) + 1, last)  # after the rerun's first save
        chosen.append(step)
        proc = start(tfds_dir, tmp_path)
        _, err = signal_at(proc, tmp_path, step, signum)
        lines = err.strip().splitlines()
        note = f"{signum.name} after checkpoint {step}: {err}"
        assert proc.returncode == status, note
        assert "Traceback" not in err, note
        saved = latest(tmp_path)
        assert lines[-1] == (f"stopped: {signum.name} received: step {saved} is saved in "
                             f"{tmp_path}; rerun the same command to resume."), note
        assert step <= saved < TOTAL_STEPS, note
    rerun = start(tfds_dir, tmp_path)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert_bit_identical(tmp_path, uninterrupted, f"stopped after checkpoints {chosen}")


def test_a_checkpoints_file_in_the_workdir_is_one_line_and_no_hang(tfds_dir, tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    proc = start(tfds_dir, tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [
        f"error: {tmp_path / 'checkpoints'} is a file, not a checkpoint directory; move it away "
        "or pass another --workdir."]
