"""A run that cannot work stops before anything is written: its workdir is never created."""

import jax
import pytest

import models
from research import convert, preprocess, pretrained, train
from research.errors import CheckpointError, ConfigError, DataError
from tests.research.test_claims_freeze import cached_vit_run, small_vit_checkpoint

DIGITS = "data.name='digits',data.mean=(32.0,),data.std=(48.0,),data.per_class=4,train.batch_size=8"


def lenet5_checkpoint(directory):
    model = models.create("lenet5", num_classes=10, in_chans=1)
    meta = dict(model=pretrained.model_meta("lenet5", model, {}),
                preprocess=preprocess.make_spec((32.0,), (48.0,)))
    return convert.write(directory, models.init_variables(model, jax.random.key(0), 28), meta)


def assert_stops_before_writing(make_config, workdir, overrides, error, match, **freeze):
    cfg = make_config("fashion_mnist.py", overrides)
    cfg.freeze.update(freeze)
    with pytest.raises(error, match=match):
        train.train_and_evaluate(cfg, workdir)
    assert not workdir.exists(), sorted(p.name for p in workdir.rglob("*"))


@pytest.mark.parametrize("regex,match", [("stage9/.*", "matches no parameter path"),
                                         ("stage1/(", "not a valid regular expression")])
def test_bad_freeze_regex(make_config, tmp_path, regex, match):
    assert_stops_before_writing(make_config, tmp_path / "run", DIGITS, ConfigError, match,
                                regex=(regex,))


def test_missing_dataset(make_config, tmp_path):
    assert_stops_before_writing(
        make_config, tmp_path / "run", f"data.name='cifar10',data.tfds_dir='{tmp_path / 'tfds'}'",
        DataError, "tfds build cifar10")


def test_checkpoint_of_another_architecture(make_config, tmp_path):
    checkpoint = lenet5_checkpoint(tmp_path / "lenet5")
    assert_stops_before_writing(
        make_config, tmp_path / "run",
        f"{DIGITS},model.name='resnet_small',init.checkpoint='{checkpoint}'",
        CheckpointError, "does not fit the model")


def test_cached_prefix_refusal(make_config, tmp_path):
    checkpoint = small_vit_checkpoint(tmp_path / "vit")
    assert_stops_before_writing(make_config, tmp_path / "run", cached_vit_run(checkpoint, 0.3),
                                ConfigError, "random in training")


def test_cached_prefix_without_a_frozen_prefix(make_config, tmp_path):
    assert_stops_before_writing(make_config, tmp_path / "run",
                                f"{DIGITS},freeze.cache_prefix=True", ConfigError, "freeze.depth")
