import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research import pretrained
from tests import reference

ROOT = Path(__file__).resolve().parents[2]


def convert(*args):
    return subprocess.run([sys.executable, "-m", "scripts.convert", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_convert_writes_a_loadable_checkpoint_with_preprocessing(tmp_path):
    torch = reference.torch_or_skip()
    import torchvision
    ref = torchvision.models.resnet18(weights=None, num_classes=10)
    reference.randomise_batchnorm(ref)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    done = convert("--source", "torchvision", "--arch", "resnet18", "--input",
                   tmp_path / "r18.pth", "--output", tmp_path / "out", "--num_classes", 10)
    assert done.returncode == 0, done.stderr
    loaded = pretrained.load(tmp_path / "out")
    assert loaded.meta["preprocess"]["input_size"] == 224
    assert loaded.meta["preprocess"]["resize"] == 256
    reference.assert_checkpoint_matches(loaded, ref, reference.imagenet_normalise)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    torch = reference.torch_or_skip()
    ran = tmp_path / "the payload ran"
    torch.save({"fc.weight": torch.zeros(2, 2), "hook": Exploit(ran)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)  # an unsafe load runs the payload
    assert ran.read_text() == PAYLOAD
    ran.unlink()
    done = convert("--source", "torchvision", "--arch", "resnet18", "--input",
                   tmp_path / "evil.pth", "--output", tmp_path / "out")
    assert done.returncode == 2
    assert "refused" in done.stderr and "could run code" in done.stderr
    assert not ran.exists() and PAYLOAD not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


def test_state_dict_of_another_variant_lists_paths(tmp_path):
    torch = reference.torch_or_skip()
    import torchvision
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    done = convert("--source", "torchvision", "--arch", "resnet34", "--input",
                   tmp_path / "r18.pth", "--output", tmp_path / "out")
    assert done.returncode == 2
    assert "missing" in done.stderr and "stage1/block2/conv1/kernel" in done.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_names_the_file(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file
    save_file({"fc.weight": np.zeros((10, 512), np.float32)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    done = convert("--source", "torchvision", "--arch", "resnet18", "--input",
                   tmp_path / "w.safetensors", "--output", tmp_path / "out")
    assert done.returncode == 2 and "w.safetensors" in done.stderr and "truncated" in done.stderr


PAYLOAD = "this would run on load"


class Exploit:
    """Unpickled, writes ``PAYLOAD`` to the file ``path`` (and returns its length)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, (PAYLOAD,))


def test_preprocessing_follows_torchvisions_eval_transforms():
    reference.torch_or_skip()
    import torchvision.models as tvm
    from research.convert import torchvision as tv
    names = {"vit_b16": "vit_b_16", "vit_b32": "vit_b_32", "vit_l16": "vit_l_16",
             "vit_l32": "vit_l_32"}
    for arch in tv.supported():
        transforms = list(tvm.get_model_weights(names.get(arch, arch)))[0].transforms()
        spec = tv.preprocessing(arch)
        assert (spec["input_size"], spec["resize"], spec["interpolation"]) == (
            transforms.crop_size[0], transforms.resize_size[0], transforms.interpolation.value), arch
