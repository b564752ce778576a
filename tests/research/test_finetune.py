"""configs/finetune.py end to end: a converted torchvision checkpoint fine-tuned on an image
folder; and a run with augmentation resumes bit-identical."""

import jax
import numpy as np
import pytest

from research import checkpoints, config, train
from research.errors import ConfigError
from tests import reference
from tests.research.test_pipeline import write_fashion_folder
from tests.scripts.test_convert_cli import convert


@pytest.mark.slow
def test_finetune_a_converted_checkpoint_on_an_image_folder(tmp_path):
    torch = reference.torch_or_skip()
    import torchvision
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    done = convert("--source", "torchvision", "--arch", "resnet18", "--input",
                   tmp_path / "r18.pth", "--output", tmp_path / "r18")
    assert done.returncode == 0, done.stderr
    folder = write_fashion_folder(tmp_path / "photos", per_class=8)
    cfg = config.load(f"configs/finetune.py:checkpoint={tmp_path / 'r18'},folder={folder},"
                      "reduced=True,train.progress=False")
    result = train.train_and_evaluate(cfg, tmp_path / "run")
    assert result["n_train"] == 3 * 8 - 3 * 2 and 0 <= result["test_accuracy"] <= 1
    assert np.isfinite(result["test_loss"])
    _, meta, _ = checkpoints.restore(tmp_path / "run")
    assert meta["class_names"] == sorted(p.name for p in folder.iterdir())
    assert meta["model"]["name"] == "resnet18" and meta["num_classes"] == 3
    assert meta["preprocess"]["input_size"] == 32  # reduced: data.image_size=32
    assert meta["preprocess"]["crop_fraction"] == pytest.approx(224 / 256)  # torchvision's


def test_finetune_names_what_it_needs():
    with pytest.raises(ConfigError, match="checkpoint=DIR .* and folder=PATH"):
        config.load("configs/finetune.py:folder=/tmp")


def test_augmented_run_resumes_bit_identical(make_config, tmp_path):
    folder = write_fashion_folder(tmp_path / "photos", per_class=8)
    cfg = make_config("fashion_mnist.py", f"data.name='folder:{folder}',data.image_size=28,"
                      "data.augment='inception',data.flip=0.5,model.name='lenet5',"
                      "data.mean=None,data.std=None,train.batch_size=8,train.epochs=3.0,"
                      "train.checkpoint_every_epochs=0.0")
    whole = train.train_and_evaluate(cfg, tmp_path / "whole")["state"]
    train.train_and_evaluate(cfg, tmp_path / "resumed", stop_after=3)
    resumed = train.train_and_evaluate(cfg, tmp_path / "resumed")["state"]
    assert int(resumed.step) == int(whole.step) == 6
    whole, resumed = jax.device_get(whole), jax.device_get(resumed)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
