import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from research.convert import convert_file
from research.convert import torchvision as tv
from research.errors import CheckpointError
from tests import reference

PARAM_COUNTS = {  # torchvision's published num_params, 1000 classes
    "alexnet": 61_100_840,
    "vgg11": 132_863_336, "vgg13": 133_047_848, "vgg16": 138_357_544, "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840, "vgg13_bn": 133_053_736, "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
}
LIGHT_AT_224 = ("alexnet", "vgg11", "vgg11_bn")  # the others are marked slow at 224


@pytest.mark.parametrize("arch", PARAM_COUNTS)
def test_param_count(arch):
    model = models.create(arch, num_classes=1000)
    assert reference.param_count(model, 224) == PARAM_COUNTS[arch]


def _randomise_weights(torch_model, seed: int = 0) -> None:
    """He-normal convolutions, unit-gain Linear layers and N(0, 0.1) biases, so that logits
    are O(1) and every bias is non-zero (torchvision's initialisation leaves VGG's biases
    at zero and AlexNet's logits near 0.03, too small for an absolute tolerance to test)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    gains = {torch.nn.Conv2d: "relu", torch.nn.Linear: "linear"}
    with torch.no_grad():
        for module in torch_model.modules():
            if type(module) in gains:
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity=gains[type(module)],
                                              generator=gen)
                torch.nn.init.normal_(module.bias, std=0.1, generator=gen)


@functools.lru_cache(maxsize=1)  # consecutive tests of one architecture convert it once
def _converted(arch: str, directory):
    reference.torch_or_skip()
    import torch
    import torchvision
    ref = getattr(torchvision.models, arch)(weights=None)
    _randomise_weights(ref)
    reference.randomise_batchnorm(ref)
    path = directory / f"{arch}.pth"
    torch.save(ref.state_dict(), path)
    model, variables = convert_file("torchvision", path, arch)
    path.unlink()
    return ref, model, variables


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("torchvision")
    yield lambda arch: _converted(arch, directory)
    _converted.cache_clear()


def _logit_cases():
    """Every architecture at a small size and at 224, grouped by architecture so that one
    cached conversion serves both. AlexNet's 63 is its minimum (1×1 features pooled to 6×6);
    VGG's 64 leaves 2×2 features, which the 7×7 adaptive pool spreads over overlapping bins."""
    cases = []
    for arch in PARAM_COUNTS:
        cases.append(pytest.param(arch, 63 if arch == "alexnet" else 64, id=f"{arch}-small"))
        slow = () if arch in LIGHT_AT_224 else (pytest.mark.slow,)
        cases.append(pytest.param(arch, 224, id=f"{arch}-224", marks=slow))
    return cases


@pytest.mark.parametrize("arch,size", _logit_cases())
def test_logits_match_torchvision(arch, size, converted):
    ref, model, variables = converted(arch)
    x = reference.random_images(size)
    np.testing.assert_allclose(reference.flax_logits(model, variables, x),
                               reference.torch_logits(ref, x), atol=1e-4, rtol=0)


def test_vgg16_state_dict_does_not_fit_vgg16_bn():
    reference.torch_or_skip()
    import torchvision
    state_dict = {k: v.numpy() for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        tv.convert_weights(state_dict, "vgg16_bn")
    message = str(err.value)
    assert "missing (64)" in message and "params/block1/bn1/scale" in message
    assert "params/features/2/kernel" in message  # vgg16's block1/conv2: no rule renames it
    # vgg16's block2/conv2 lands on vgg16_bn's block2/conv1:
    assert "params/block2/conv1/kernel: (3, 3, 128, 128) in state dict" in message


@pytest.mark.parametrize("arch", PARAM_COUNTS)
def test_blocks_are_the_parameters_in_forward_order(arch):
    model = models.create(arch, num_classes=10)
    size = models.model_info(arch).min_size
    variables = models.variable_shapes(model, size)
    assert reference.creation_order(model, size) == tuple(model.blocks)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    features = jax.eval_shape(functools.partial(model.apply, pre_logits=True), variables, x)
    assert features.shape == (2, 4096)


@pytest.mark.parametrize("arch,options", [("alexnet", {}),
                                          ("vgg11_bn", {"widths": (8, 16, 16, 16, 16)})])
def test_train_mode_uses_dropout_and_batch_stats(arch, options):
    model = models.create(arch, num_classes=10, in_chans=1, **options)
    size = models.model_info(arch).min_size
    variables = models.init_variables(model, jax.random.key(0), size)
    x = reference.random_images(size, channels=1)

    def train_logits(module, seed):
        return module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)},
                            mutable=["batch_stats"])

    (logits, updates), (other, _) = train_logits(model, 1), train_logits(model, 2)
    assert logits.shape == (2, 10)
    assert not np.allclose(logits, other)
    no_dropout = model.clone(dropout=0.0)
    np.testing.assert_array_equal(train_logits(no_dropout, 1)[0], train_logits(no_dropout, 2)[0])
    assert ("batch_stats" in variables) == arch.endswith("_bn")
    if arch.endswith("_bn"):
        assert not np.allclose(updates["batch_stats"]["block1"]["bn1"]["mean"],
                               variables["batch_stats"]["block1"]["bn1"]["mean"])
