import numpy as np
import pytest

import models
from research.convert import convert_file
from tests import reference

COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
          "resnet101": 44_549_160, "resnet152": 60_192_808}


@pytest.mark.parametrize("arch", sorted(COUNTS))
def test_parameter_count(arch):
    assert reference.param_count(models.create(arch, num_classes=1000), 224) == COUNTS[arch]


def test_lenet5_parameter_count_and_padding():
    model = models.create("lenet5", num_classes=10, in_chans=1)
    assert reference.param_count(model, 28) == reference.param_count(model, 32) == 61_706


def test_small_resnet_has_five_blocks_for_28px_images():
    model = models.create("resnet_small", num_classes=10, in_chans=1)
    assert len(model.blocks) >= 5
    assert set(models.variable_shapes(model, 28)["params"]) == set(model.blocks)


@pytest.mark.parametrize("arch,sizes", [
    ("resnet18", (224, 64)), ("resnet34", (224, 64)), ("resnet50", (224, 96)),
    pytest.param("resnet101", (224, 64), marks=pytest.mark.slow),
    pytest.param("resnet152", (224, 64), marks=pytest.mark.slow)])
def test_logits_match_torchvision(arch, sizes, tmp_path):
    torch = reference.torch_or_skip()
    import torchvision
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None)
    reference.randomise_batchnorm(ref)
    damp_residual_branches(ref)
    path = tmp_path / f"{arch}.pth"
    torch.save(ref.state_dict(), path)
    model, variables = convert_file("torchvision", path, arch)
    for size in sizes:
        x = reference.random_images(size)
        np.testing.assert_allclose(reference.flax_logits(model, variables, x),
                                   reference.torch_logits(ref, x), atol=1e-4, rtol=0)


def damp_residual_branches(ref, factor: float = 0.3) -> None:
    """Scale each block's last BN by ``factor``: with full-scale random branches the residual
    stream of ResNet-101/152 grows until float32 itself (torch's too) is 2e-4 off float64."""
    import torch
    from torchvision.models.resnet import BasicBlock, Bottleneck
    with torch.no_grad():
        for block in ref.modules():
            if isinstance(block, (BasicBlock, Bottleneck)):
                last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                last.weight.mul_(factor)


def test_registry_lists_and_refuses_unknown_names():
    assert {"resnet18", "resnet50", "lenet5"} <= set(models.list_models())
    assert models.list_models("resnet1*") == ["resnet101", "resnet152", "resnet18"]
    with pytest.raises(ValueError, match="Did you mean resnet50"):
        models.create("resnet05", num_classes=10)
    with pytest.raises(TypeError, match="does not take"):
        models.create("resnet18", num_classes=10, widht=3)
