"""Two processes on loopback (four CPU devices each): an interrupted two-process run resumes to
the uninterrupted run's final state, bit for bit, and only process 0 writes the metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from research import data
from tests.research.test_multiprocess import free_port

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ("data.name='digits',data.mean=(32.0,),data.std=(48.0,),train.batch_size=64,"
             "train.epochs=0.5,train.eval_every_epochs=0.125,train.progress=False")
# Trains, then process 0 saves the final variables (replicated: one device's copy) to argv[3].
TRAIN = """
import sys
import jax
import numpy as np
from scripts import common
common.start_distributed()
from research import config, train, tree
stop = int(sys.argv[4]) if len(sys.argv) > 4 else None
state = train.train_and_evaluate(config.load(sys.argv[1]), sys.argv[2], stop_after=stop)["state"]
if jax.process_index() == 0:
    local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.variables())
    np.savez(sys.argv[3], **tree.flatten(local))
"""


def train_in_two_processes(config: str, workdir: Path, *stop_after) -> dict:
    """The final variables (flat) of a two-process run in ``workdir``."""
    port = free_port()
    final = workdir.parent / f"{workdir.name}.npz"
    procs = [subprocess.Popen(
        [sys.executable, "-c", TRAIN, config, str(workdir), final, *map(str, stop_after)],
        cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
             "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with np.load(final) as arrays:
        return dict(arrays)


def steps_recorded(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_run_resumes_bit_identical_and_process_0_alone_writes(make_config, tfds_dir,
                                                                          tmp_path):
    # Prepared here first: two processes preparing one dataset at once collide.
    data.load_splits(make_config("fashion_mnist.py", OVERRIDES).data, seed=0)
    config = f"{ROOT}/configs/fashion_mnist.py:{OVERRIDES},data.tfds_dir={tfds_dir}"
    whole = train_in_two_processes(config, tmp_path / "whole")
    train_in_two_processes(config, tmp_path / "resumed", 4)
    resumed = train_in_two_processes(config, tmp_path / "resumed")
    assert sorted(whole) == sorted(resumed) and len(whole) > 20
    for path, value in whole.items():
        np.testing.assert_array_equal(resumed[path], value, err_msg=path)
    # One line per evaluation: a second writer would repeat each.
    assert steps_recorded(tmp_path / "whole") == [3, 6, 9, 11]
