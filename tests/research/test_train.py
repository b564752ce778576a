import json

import jax
import numpy as np
import pytest

from research import pretrained, sharding, train, tree
from research.errors import CheckpointError, ConfigError

FEW = "data.per_class=40,train.batch_size=40,train.epochs=3.0"


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_fashion_mnist(make_config, tmp_path):
    cfg = make_config("fashion_mnist.py", f"{FEW},train.epochs=4.0,optim.lr=0.05")
    train.train_and_evaluate(cfg, tmp_path)
    history = records(tmp_path)
    assert len(history) == 4
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_resumed_run_ends_bit_identical(make_config, tmp_path):
    cfg = make_config("fashion_mnist.py", f"{FEW},train.checkpoint_every_epochs=0.0")
    whole = train.train_and_evaluate(cfg, tmp_path / "whole")["state"]
    interrupted = train.train_and_evaluate(cfg, tmp_path / "resumed", stop_after=13)
    assert int(interrupted["state"].step) == 13
    resumed = train.train_and_evaluate(cfg, tmp_path / "resumed")["state"]
    assert int(resumed.step) == int(whole.step) == 30
    whole, resumed = jax.device_get(whole), jax.device_get(resumed)
    assert jax.tree.structure(whole) == jax.tree.structure(resumed)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # One record an epoch, as without the stop; the interrupted epoch's train loss averages
    # all its steps, those before the stop too (summed in another order: 1e-12).
    expected, got = records(tmp_path / "whole"), records(tmp_path / "resumed")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [10, 20, 30]
    for e, g in zip(expected, got, strict=True):
        assert g == pytest.approx(e, rel=1e-12, abs=0)


@pytest.fixture(scope="module")
def ten_class_run(tmp_path_factory, tfds_dir):
    from research import config
    workdir = tmp_path_factory.mktemp("ten_class")
    cfg = config.load(f"configs/fashion_mnist.py:data.tfds_dir={tfds_dir},train.progress=False,"
                      "data.per_class=8,train.batch_size=40,train.epochs=1.0")
    train.train_and_evaluate(cfg, workdir)
    return workdir


def test_pretrained_load_returns_model_variables_meta(ten_class_run):
    loaded = pretrained.load(ten_class_run)
    assert loaded.model.num_classes == 10 and loaded.meta["model"]["name"] == "resnet_small"
    assert loaded.meta["config"]["data"]["per_class"] == 8
    logits = loaded.model.apply(loaded.variables, loaded.preprocess(np.zeros((2, 28, 28, 1))))
    assert logits.shape == (2, 10)


def test_checkpoint_with_another_head_loads_with_dont_load(make_config, ten_class_run):
    cfg = make_config("fashion_mnist.py", f"{FEW},data.classes=(5,6,7,8,9),"
                      f"init.checkpoint='{ten_class_run}',model.name=''")
    exp = train.build(cfg)
    source = pretrained.load(ten_class_run)
    loaded, fresh = tree.flatten(source.variables["params"]), tree.flatten(exp.state.params)
    assert fresh["head/kernel"].shape == (64, 5)
    np.testing.assert_array_equal(fresh["stage2/block0/conv1/kernel"],
                                  loaded["stage2/block0/conv1/kernel"])


def test_mismatch_outside_dont_load_names_the_paths(make_config, ten_class_run):
    cfg = make_config("fashion_mnist.py", f"{FEW},data.classes=(5,6,7,8,9),"
                      f"init.checkpoint='{ten_class_run}',init.dont_load=()")
    with pytest.raises(CheckpointError, match=r"(?s)mis-shaped.*head/kernel: \(64, 10\)"):
        train.build(cfg)


def test_path_that_is_not_a_checkpoint(make_config, tmp_path):
    cfg = make_config("fashion_mnist.py", f"init.checkpoint='{tmp_path}'")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        train.build(cfg)


def test_unknown_config_key_names_the_fix(make_config):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*Did you mean lr"):
        make_config("fashion_mnist.py", "optim.lrr=0.1")


def test_bad_input_leaves_no_workdir(make_config, tmp_path):
    cfg = make_config("fashion_mnist.py", "freeze.depth=99")
    with pytest.raises(ConfigError):
        train.train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_eight_device_mesh_shards_the_batch(make_config):
    exp = train.build(make_config("fashion_mnist.py", FEW))
    assert exp.mesh.size == jax.device_count() == 8
    images, labels = sharding.global_batch(exp.mesh, np.zeros((40, 28, 28, 1), np.uint8),
                                        np.zeros(40, np.int32))
    assert len(images.sharding.device_set) == 8 and images.addressable_shards[0].data.shape[0] == 5


@pytest.mark.parametrize("model, without", [
    ("model.name='lenet5',model.options={'dropout':0.5}", "model.options={'dropout':0.0}"),
    pytest.param("model.name='googlenet',model.options={'aux_logits':True},data.image_size=32",
                 "train.aux_loss_weight=0.0", marks=pytest.mark.slow)])
def test_dropout_and_auxiliary_heads_train_on_the_mesh(make_config, tmp_path, model, without):
    """Dropout (or the auxiliary heads' loss) is at work: the same run without it ends with
    other parameters."""
    def run(extra, workdir):
        cfg = make_config("fashion_mnist.py", f"data.name='digits',{model},train.batch_size=32,"
                          f"train.epochs=0.1,data.mean=(32.0,),data.std=(48.0,){extra}")
        return train.train_and_evaluate(cfg, tmp_path / workdir)
    result, plain = run("", "with"), run(f",{without}", "without")
    assert np.isfinite(result["train_loss"]) and result["step"] == plain["step"] == 4
    differences = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                               result["state"].params, plain["state"].params)
    assert max(jax.tree.leaves(differences)) > 1e-4


def test_first_argmax_is_jnp_argmax_ties_included():
    logits = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    logits[:8] = 0.0  # a zero-initialised head: every class ties
    logits[8:16, 3] = logits[8:16, 7] = 9.0
    np.testing.assert_array_equal(train.first_argmax(logits), np.argmax(logits, -1))
