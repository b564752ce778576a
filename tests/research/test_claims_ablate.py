"""research.ablate's claims: a run's seed decides it (another seed, another run; the same seed,
the same run), and ``pretrain.init.checkpoint`` is used as it is, with nothing pretrained."""

from pathlib import Path

import jax
import numpy as np
import pytest

import models
from research import ablate, config, convert, preprocess, pretrained, tree

ROOT = Path(__file__).resolve().parents[2]
RUN = "finetune_depth3_seed{}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Weights to reuse: a random resnet_small for five one-channel classes."""
    model = models.create("resnet_small", num_classes=5, in_chans=1)
    meta = dict(model=pretrained.model_meta("resnet_small", model, {}),
                preprocess=preprocess.make_spec((72.94,), (90.02,)))
    return convert.write(tmp_path_factory.mktemp("weights") / "ckpt",
                         models.init_variables(model, jax.random.key(7), 28), meta)


def ablation(tfds_dir, checkpoint, seeds):
    return config.load(
        f"{ROOT}/configs/quickstart.py:reduced=True,pretrain.data.tfds_dir={tfds_dir},"
        f"transfer.data.tfds_dir={tfds_dir},pretrain.init.checkpoint='{checkpoint}',"
        f"transfer.train.epochs=1.0,regimes=('finetune',),depths=(3,),sweep.seeds={seeds}")


def params(workdir, seed):
    return tree.flatten(pretrained.load(workdir / "runs" / RUN.format(seed)).variables["params"])


@pytest.fixture(scope="module")
def two_seeds(tfds_dir, checkpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ablation")
    ablate.run_sweep(ablation(tfds_dir, checkpoint, (0, 1)), workdir)
    return workdir


def test_reused_checkpoint_is_not_pretrained_again(two_seeds, checkpoint):
    assert not (two_seeds / "pretrain").exists()
    reused = tree.flatten(pretrained.load(checkpoint).variables["params"])
    for seed in (0, 1):
        trained = params(two_seeds, seed)
        frozen = [p for p in trained if p.startswith(("stem/", "stage1/", "stage2/"))]
        assert frozen
        for path in frozen:  # the frozen blocks are the reused weights, bit for bit
            np.testing.assert_array_equal(trained[path], reused[path], err_msg=path)


def test_seeds_decide_the_runs(two_seeds, tfds_dir, checkpoint, tmp_path):
    ablate.run_sweep(ablation(tfds_dir, checkpoint, (1,)), tmp_path)
    seed0, seed1, seed1_again = params(two_seeds, 0), params(two_seeds, 1), params(tmp_path, 1)
    assert sorted(seed1_again) == sorted(seed1)
    for path, value in seed1.items():
        np.testing.assert_array_equal(seed1_again[path], value, err_msg=path)
    assert not np.array_equal(seed0["stage3/block0/conv1/kernel"],
                              seed1["stage3/block0/conv1/kernel"])
