import numpy as np
import pytest
import torch

from research.convert import torchvision as tv
from tests import reference


@pytest.mark.parametrize("arch,sizes", [("resnet18", (224, 64)), ("resnet50", (224, 96))])
def test_resnet_logits_match_torchvision(arch, sizes, tmp_path):
    reference.torch_or_skip()
    import torchvision
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None)
    reference.randomise_batchnorm(ref)
    path = tmp_path / f"{arch}.pth"
    torch.save(ref.state_dict(), path)
    model, variables = tv.convert_file(path, arch)
    for size in sizes:
        x = reference.random_images(size)
        np.testing.assert_allclose(reference.flax_logits(model, variables, x),
                                   reference.torch_logits(ref, x), atol=1e-4, rtol=0)
