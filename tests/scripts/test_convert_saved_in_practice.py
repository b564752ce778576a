"""Checkpoints as people save them: torchvision files that differ from its ImageNet-1k ones."""

import pytest

from research import pretrained
from tests import reference
from tests.models.test_inception import save_state_dict, torchvision_reference
from tests.scripts.test_convert_cli import convert


@pytest.mark.slow
def test_inception_v3_saved_without_aux_head_converts_without_it(tmp_path):
    ref = torchvision_reference("inception_v3", 299, aux_logits=False, transform_input=True,
                                dropout=0.0, num_classes=10)
    path = save_state_dict(ref, tmp_path / "inception_v3.pth")
    assert not any(k.startswith("AuxLogits.") for k in ref.state_dict())
    done = convert("--source", "torchvision", "--arch", "inception_v3", "--input", path,
                   "--output", tmp_path / "out", "--num_classes", 10)
    assert done.returncode == 0, done.stderr
    loaded = pretrained.load(tmp_path / "out")
    assert loaded.meta["model"]["options"]["aux_logits"] is False
    assert "AuxLogits" not in loaded.variables["params"]
    reference.assert_checkpoint_matches(loaded, ref, reference.imagenet_normalise, size=299)


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [384])
def test_vit_trained_at_another_resolution_converts_at_that_size(tmp_path, image_size):
    torch = reference.torch_or_skip()
    import torchvision
    torch.manual_seed(0)
    ref = torchvision.models.vit_b_32(weights=None, image_size=image_size, num_classes=10).eval()
    reference.randomise_constants(ref)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    done = convert("--source", "torchvision", "--arch", "vit_b32", "--input",
                   tmp_path / "vit.pth", "--output", tmp_path / "out", "--num_classes", 10)
    assert done.returncode == 0, done.stderr
    loaded = pretrained.load(tmp_path / "out")
    spec = loaded.meta["preprocess"]
    assert (spec["input_size"], spec["resize"], spec["crop_fraction"]) == (image_size,) * 2 + (1.0,)
    tokens = loaded.variables["params"]["embed"]["pos_embedding"].shape[1]
    assert tokens == (image_size // 32) ** 2 + 1
    reference.assert_checkpoint_matches(loaded, ref, reference.imagenet_normalise, size=image_size)
