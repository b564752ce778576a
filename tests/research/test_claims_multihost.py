"""Two processes on loopback (four CPU devices each): an interrupted two-process run resumes to
the uninterrupted run's final state, bit for bit, and only process 0 writes the metrics; a
checkpoint two processes wrote (parameters sharded over ``mesh.fsdp``) resumes in one process,
and one that one process wrote resumes in two."""

from pathlib import Path

import jax
import numpy as np
import pytest

from research import data, train, tree
from tests.research.test_multiprocess import records, run_in_two_processes

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ("data.name='digits',data.mean=(32.0,),data.std=(48.0,),train.batch_size=64,"
             "train.epochs=0.5,train.eval_every_epochs=0.125,train.progress=False")
# Trains, then process 0 saves the final variables (gathered from every shard) to argv[3].
TRAIN = """
import sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from scripts import common
common.start_distributed()
from research import config, train, tree
stop = int(sys.argv[4]) if len(sys.argv) > 4 else None
state = train.train_and_evaluate(config.load(sys.argv[1]), sys.argv[2], stop_after=stop)["state"]
variables = multihost_utils.process_allgather(state.variables(), tiled=True)
if jax.process_index() == 0:
    np.savez(sys.argv[3], **tree.flatten(variables))
"""


def train_in_two_processes(config: str, workdir: Path, *stop_after) -> dict:
    """The final variables (flat) of a two-process run in ``workdir``."""
    final = workdir.parent / f"{workdir.name}.npz"
    run_in_two_processes(["-c", TRAIN, config, workdir, final, *stop_after], timeout=300)
    with np.load(final) as arrays:
        return dict(arrays)


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
    assert [r["step"] for r in records(tmp_path / "whole")] == [3, 6, 9, 11]


@pytest.mark.slow
def test_checkpoints_resume_in_another_number_of_processes(make_config, tfds_dir, tmp_path):
    """One process trains a step, two resume its checkpoint (parameters sharded over
    ``mesh.fsdp``) for two more, one resumes theirs to the end: where an uninterrupted
    one-process run on the same 8 devices ends (sums in other layouts: 1e-5)."""
    run = f"{OVERRIDES},model.name='lenet5',train.epochs=0.2,train.eval_every_epochs=0.0"
    cfg = make_config("fashion_mnist.py", run)  # 4 steps
    data.load_splits(cfg.data, seed=0)
    two = f"{ROOT}/configs/fashion_mnist.py:{run},data.tfds_dir={tfds_dir},mesh.fsdp=2"
    final = lambda result: tree.flatten(jax.device_get(result["state"].variables()))
    expected = final(train.train_and_evaluate(cfg, tmp_path / "whole"))
    train.train_and_evaluate(cfg, tmp_path / "moved", stop_after=1)
    train_in_two_processes(two, tmp_path / "moved", 3)
    assert sorted(int(p.name) for p in (tmp_path / "moved" / "checkpoints").iterdir()) == [1, 3]
    got = final(train.train_and_evaluate(cfg, tmp_path / "moved"))
    assert sorted(got) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-5, err_msg=path)
