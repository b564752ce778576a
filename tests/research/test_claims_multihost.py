"""Two processes on loopback (four CPU devices each): an interrupted two-process run resumes to
the uninterrupted run's final state, bit for bit, and only process 0 writes the metrics."""

from pathlib import Path

import numpy as np

from research import data
from tests.research.test_multiprocess import records, run_in_two_processes

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
