"""Two processes on loopback, four CPU devices each, train as one 8-device data-parallel run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from research import train

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ("data.name='digits',train.epochs=0.5,train.batch_size=64,train.progress=False,"
             "data.mean=(32.0,),data.std=(48.0,)")


def records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_two_processes(args: list, timeout: int) -> None:
    """``python *args`` as the two processes of one run on loopback (4 CPU devices each);
    both must exit 0."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
             "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs


@pytest.mark.slow
def test_two_processes_train_like_one(make_config, tfds_dir, tmp_path):
    single = train.train_and_evaluate(make_config("fashion_mnist.py", OVERRIDES), tmp_path / "one")
    config = f"{ROOT}/configs/fashion_mnist.py:{OVERRIDES},data.tfds_dir={tfds_dir}"
    run_in_two_processes(["-m", "scripts.train", "--config", config, "--workdir",
                          tmp_path / "two"], timeout=600)
    assert (tmp_path / "two" / "checkpoints" / "11").is_dir()
    # Each process read its own half of every batch: the one-process run's train and test
    # loss, up to the order of the sums.
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [11]
    assert two[0] == pytest.approx(one[0], rel=1e-5)
