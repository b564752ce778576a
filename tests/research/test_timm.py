import functools
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from research import pretrained
from research.convert import convert_file
from research.convert import timm as timm_convert
from research.errors import CheckpointError
from tests import reference

ROOT = Path(__file__).resolve().parents[2]

SMALL = 75  # odd, so that strided layers see odd sizes
# (timm's model name, input size): every CNN at SMALL, and most families (and flavours) at
# their default size too; every ViT at its own (the position embedding fixes it). Larger CNNs at
# their default sizes (EfficientNet-B7 at 600 px) would add half an hour of float64 reference
# computations and no rule that these do not exercise. One quick case per family, the rest slow.
AT_DEFAULT_SIZE = {"resnet18", "resnet50", "vgg16", "inception_v3", "legacy_xception",
                   "mobilenetv3_small_100", "efficientnet_b0", "tf_efficientnet_b0"}
QUICK = {("resnet18", 224), ("resnet18", SMALL), ("vgg11_bn", SMALL), ("inception_v3", SMALL),
         ("legacy_xception", SMALL), ("mobilenetv3_small_100", 224),
         ("mobilenetv3_small_100", SMALL), ("tf_efficientnet_b0", SMALL),
         ("vit_tiny_patch16_224", 224), ("vit_tiny_patch16_384", 384)}


def _cases():
    cases = []
    for name in timm_convert.supported():
        if timm_convert.timm_name(name) != name:
            continue  # one of our registry names, standing for one of timm's
        default = timm_convert.preprocessing(name)["input_size"]
        if name.startswith("vit"):
            sizes = (default,)
        else:
            sizes = (default, SMALL) if name in AT_DEFAULT_SIZE else (SMALL,)
        cases += [pytest.param(name, size, id=f"{name}-{size}",
                               marks=() if (name, size) in QUICK else (pytest.mark.slow,))
                  for size in sizes]
    return cases


def timm_model(name: str, **kwargs):
    """timm's ``name`` with 1000 classes (its default for vit_large_patch32_224 is headless)."""
    torch = reference.torch_or_skip()
    timm = pytest.importorskip("timm", reason="the timm reference tests need timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)


def timm_reference(name: str):
    """timm's ``name`` with random weights, BatchNorm statistics measured at its default input
    size, and a classifier drawn with std 1/√fan-in, so that logits are O(1) (inception_v3
    draws it with std 0.1: logits of ~10, whose float32 rounding exceeds the tolerance).

    Statistics measured on smaller images do not hold on larger ones: measured at 224 px,
    EfficientNet-B7's (BatchNorm epsilon 1e-5) logits at 600 px reach ~40.
    """
    import torch
    ref = timm_model(name)
    if name.startswith("vit"):
        reference.randomise_constants(ref)
    else:
        size = timm_convert.preprocessing(name)["input_size"]
        reference.randomise_batchnorm(ref, image_size=size)
        damp_residual_branches(ref)
    classifier = ref.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape) * classifier.in_features**-0.5)
    return ref


def damp_residual_branches(ref, factor: float = 0.3) -> None:
    """Scales down the last BatchNorm of each ResNet block (timm starts them at zero).

    At full scale, the residual stream of ResNet-101 / 152 grows until its BatchNorms subtract
    near-equal numbers: torch's own float32 logits are then 2e-4 (ResNet-101) off float64's.
    """
    import torch
    with torch.no_grad():
        for block in ref.modules():
            if hasattr(block, "zero_init_last"):
                last = block.bn3 if hasattr(block, "bn3") else block.bn2
                last.weight.mul_(factor)
                last.bias.mul_(factor)


def save_safetensors(ref, path: Path) -> Path:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    return path


@functools.lru_cache(maxsize=1)  # the cases of one model follow each other
def converted(name: str):
    """``timm_reference(name)`` and its conversion through a ``.safetensors`` file."""
    ref = timm_reference(name)
    with tempfile.TemporaryDirectory() as directory:
        path = save_safetensors(ref, Path(directory) / f"{name}.safetensors")
        return ref, *convert_file("timm", path, name)


@pytest.mark.parametrize("name,size", _cases())
def test_logits_match_timm(name, size):
    ref, model, variables = converted(name)
    x = reference.random_images(size)
    np.testing.assert_allclose(reference.flax_logits(model, variables, x),
                               reference.torch_logits(ref, x), atol=1e-4, rtol=0,
                               err_msg=f"{name} at {size}×{size}")


def test_names_and_options():
    names = timm_convert.supported()
    assert {"efficientnet_b3", "tf_efficientnet_b3", "xception", "legacy_xception",
            "vit_b16", "vit_base_patch16_224", "vit_base_patch16_384"} <= set(names)
    assert timm_convert.timm_name("efficientnet_b3") == "efficientnet_b3"
    assert timm_convert.timm_name("xception") == "legacy_xception"
    assert timm_convert.registry_name("tf_efficientnet_b3") == "efficientnet_b3"
    assert timm_convert.options("tf_efficientnet_b3") == dict(padding="same", bn_eps=1e-3,
                                                              bn_momentum=0.99)
    assert timm_convert.options("efficientnet_b7")["bn_eps"] == 1e-5  # torchvision's is 1e-3
    with pytest.raises(CheckpointError, match="no timm converter for 'resnet26'"):
        timm_convert.options("resnet26")


def test_preprocessing_is_timms_pretrained_cfg():
    timm = pytest.importorskip("timm", reason="the timm reference tests need timm")
    for name in ("resnet50", "inception_v3", "efficientnet_b1", "tf_efficientnet_b5",
                 "vit_base_patch16_384", "vgg16"):
        cfg = timm.models.get_pretrained_cfg(name)
        spec = timm_convert.preprocessing(name)
        assert spec["input_size"] == cfg.input_size[-1], name
        assert spec["resize"] == int(cfg.input_size[-1] / cfg.crop_pct), name
        assert spec["interpolation"] == cfg.interpolation, name
        np.testing.assert_allclose(spec["mean"], np.array(cfg.mean) * 255, err_msg=name)
        np.testing.assert_allclose(spec["std"], np.array(cfg.std) * 255, err_msg=name)


def test_state_dict_of_another_source_lists_paths(tmp_path):
    """torchvision's MobileNetV2 keys are not timm's."""
    reference.torch_or_skip()
    import torchvision
    path = save_safetensors(torchvision.models.mobilenet_v2(weights=None),
                            tmp_path / "tv.safetensors")
    with pytest.raises(CheckpointError) as error:
        convert_file("timm", path, "mobilenetv2_100")
    message = str(error.value)
    assert str(path) in message
    assert "batch_stats/block1/depthwise/bn/mean" in message  # missing
    assert "batch_stats/features/1/conv/0/1/mean" in message  # unexpected


def test_state_dict_of_another_variant_lists_paths(tmp_path):
    path = save_safetensors(timm_model("tf_efficientnet_b0"), tmp_path / "b0.safetensors")
    with pytest.raises(CheckpointError) as error:
        convert_file("timm", path, "tf_efficientnet_b1")
    assert "params/stage1/block1/depthwise/conv/kernel" in str(error.value)


def test_truncated_safetensors_names_the_file(tmp_path):
    path = save_safetensors(timm_model("mobilenetv3_small_100"), tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="w.safetensors.*truncated"):
        convert_file("timm", path, "mobilenetv3_small_100")


def test_convert_script_stores_options_and_preprocessing(tmp_path):
    """Given timm's model name, the checkpoint names our architecture."""
    ref = timm_reference("mobilenetv3_small_100")
    path = save_safetensors(ref, tmp_path / "mnv3.safetensors")
    done = subprocess.run([sys.executable, "-m", "scripts.convert", "--source", "timm", "--arch",
                           "mobilenetv3_small_100", "--input", str(path), "--output",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = pretrained.load(tmp_path / "out")
    assert loaded.meta["model"]["name"] == "mobilenet_v3_small"
    assert loaded.meta["source"]["arch"] == "mobilenetv3_small_100"
    assert loaded.model.bn_eps == 1e-5  # timm's, where torchvision's MobileNetV3 has 1e-3
    assert loaded.meta["preprocess"]["interpolation"] == "bicubic"
    reference.assert_checkpoint_matches(loaded, ref, reference.imagenet_normalise)
