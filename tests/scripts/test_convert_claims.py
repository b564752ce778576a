"""scripts.convert's claims: a valid torchvision ``.safetensors`` converts; a truncated input
writes nothing; an existing checkpoint is refused and left as it was; a Keras ``.h5`` converts
in a process where Keras cannot be imported."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from research import convert, preprocess, pretrained, tree
from tests import reference
from tests.research.test_keras import keras_or_skip
from tests.scripts.test_convert_cli import convert as run_convert

ROOT = Path(__file__).resolve().parents[2]


def resnet18_safetensors(path):
    """A torchvision ResNet-18 (10 classes, random weights and statistics) saved with
    ``safetensors.torch.save_file``, and the model."""
    reference.torch_or_skip()
    import torchvision
    from safetensors.torch import save_file
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    reference.randomise_batchnorm(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def files_and_contents(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def test_torchvision_safetensors_converts_and_an_existing_checkpoint_is_refused(tmp_path):
    model = resnet18_safetensors(tmp_path / "r18.safetensors")
    args = ("--source", "torchvision", "--arch", "resnet18", "--input",
            tmp_path / "r18.safetensors", "--output", tmp_path / "out", "--num_classes", 10)
    done = run_convert(*args)
    assert done.returncode == 0, done.stderr
    reference.assert_checkpoint_matches(pretrained.load(tmp_path / "out"), model,
                                        reference.imagenet_normalise)
    written = files_and_contents(tmp_path / "out")
    again = run_convert(*args)
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr, again.stderr
    assert files_and_contents(tmp_path / "out") == written


def test_truncated_input_writes_nothing(tmp_path):
    resnet18_safetensors(tmp_path / "r18.safetensors")
    data = (tmp_path / "r18.safetensors").read_bytes()
    (tmp_path / "r18.safetensors").write_bytes(data[: len(data) // 2])
    done = run_convert("--source", "torchvision", "--arch", "resnet18", "--input",
                       tmp_path / "r18.safetensors", "--output", tmp_path / "out")
    assert done.returncode == 2 and "truncated" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


WITHOUT_KERAS = """
import sys
sys.modules["keras"] = None  # `import keras` raises ImportError from here on
from research import convert
_, variables, meta = convert.convert("keras", "mobilenet_v1", sys.argv[1], num_classes=10)
convert.write(sys.argv[2], variables, meta)
"""


def test_h5_converts_where_keras_cannot_be_imported(tmp_path):
    keras = keras_or_skip()
    keras.utils.set_random_seed(0)
    source = keras.applications.MobileNet(weights=None, alpha=0.25, input_shape=(32, 32, 3),
                                          classes=10, classifier_activation=None)
    source.save(tmp_path / "mobilenet.h5")
    done = subprocess.run([sys.executable, "-c", WITHOUT_KERAS, tmp_path / "mobilenet.h5",
                           tmp_path / "out"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = pretrained.load(tmp_path / "out")
    _, variables, _ = convert.convert("keras", "mobilenet_v1", tmp_path / "mobilenet.h5",
                                      num_classes=10)
    expected, got = tree.flatten(variables), tree.flatten(loaded.variables)
    assert sorted(got) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    raw = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    keras_logits = source.predict(keras.applications.mobilenet.preprocess_input(raw.copy()),
                                  verbose=0)
    inputs = preprocess.apply(raw, {**loaded.meta["preprocess"], "input_size": 32})
    ours = loaded.model.apply(loaded.variables, inputs, train=False)
    np.testing.assert_allclose(np.asarray(ours), keras_logits, atol=1e-4, rtol=0)
