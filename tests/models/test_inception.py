import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from research import tree
from research.convert import common, convert_file
from research.convert import torchvision as tv
from research.errors import CheckpointError
from tests import reference

# inception_v3's init_weights=True draws the classifier with std 0.1: logits of ~5, whose float32
# rounding exceeds the 1e-4 tolerance (torch's own float32 logits are 1.4e-4 off float64).
TORCH_INIT = {"googlenet": True, "inception_v3": False}


def torchvision_reference(arch: str, calibration_size: int, **kwargs):
    """torchvision's ``arch`` with random weights and BatchNorm statistics measured on images of
    ``calibration_size`` (inception_v3's auxiliary head runs in training only from 299 px)."""
    torch = reference.torch_or_skip()
    import torchvision
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None, init_weights=TORCH_INIT[arch], **kwargs)
    reference.randomise_batchnorm(ref, image_size=calibration_size)
    return ref


def save_state_dict(ref, path):
    import torch
    torch.save(ref.state_dict(), path)
    return path


def torch_train_outputs(ref, images_nhwc: np.ndarray):
    """The reference's training-mode outputs (batch statistics, aux heads) in float64."""
    import copy

    import torch
    exact = copy.deepcopy(ref).double().train()
    with torch.no_grad():
        out = exact(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()).double())
    return [o.numpy() for o in out]


def flax_train_outputs(model, variables, images_nhwc: np.ndarray):
    out, _ = model.apply(variables, images_nhwc, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(0)})
    return [np.asarray(o) for o in out]


@pytest.fixture(scope="module")
def inception_v3_pair(tmp_path_factory):
    ref = torchvision_reference("inception_v3", 299, aux_logits=True, transform_input=True,
                                dropout=0.0)
    path = save_state_dict(ref, tmp_path_factory.mktemp("inception_v3") / "inception_v3.pth")
    return ref, *convert_file("torchvision", path, "inception_v3")


@pytest.mark.parametrize("arch,aux_logits,expected", [
    ("googlenet", False, 6_624_904), ("googlenet", True, 13_004_888),
    ("inception_v3", True, 27_161_264), ("inception_v3", False, 23_834_568)])
def test_parameter_counts(arch, aux_logits, expected):
    model = models.create(arch, num_classes=1000, aux_logits=aux_logits)
    assert reference.param_count(model, models.model_info(arch).input_size) == expected


@pytest.mark.parametrize("transform_input", [True, False])
def test_googlenet_logits_match_torchvision(transform_input, tmp_path):
    ref = torchvision_reference("googlenet", 224, aux_logits=False, transform_input=transform_input)
    model, variables = convert_file("torchvision", save_state_dict(ref, tmp_path / "googlenet.pth"),
                                       "googlenet")
    assert model.transform_input  # as torchvision builds it for its ImageNet weights
    model = model.clone(transform_input=transform_input)
    for size in (224, 160):
        x = reference.random_images(size)
        np.testing.assert_allclose(reference.flax_logits(model, variables, x),
                                   reference.torch_logits(ref, x), atol=1e-4, rtol=0)


def test_inception_v3_logits_match_torchvision_small(inception_v3_pair):
    ref, model, variables = inception_v3_pair
    x = reference.random_images(139)
    np.testing.assert_allclose(reference.flax_logits(model, variables, x),
                               reference.torch_logits(ref, x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_inception_v3_logits_match_torchvision_default_size(inception_v3_pair):
    ref, model, variables = inception_v3_pair
    x = reference.random_images(299)
    np.testing.assert_allclose(reference.flax_logits(model, variables, x),
                               reference.torch_logits(ref, x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_inception_v3_aux_logits_match_torchvision_in_training(inception_v3_pair):
    ref, model, variables = inception_v3_pair
    x = reference.random_images(299)
    outputs = flax_train_outputs(model.clone(dropout=0.0), variables, x)
    assert len(outputs) == 2  # InceptionOutputs(logits, aux_logits)
    # float32 rounding through 94 convolutions on batch statistics: 1.2e-4 seen on one of this
    # workplace's machines, whichever kernels (oneDNN's or XLA's) ours ran on
    for ours, theirs in zip(outputs, torch_train_outputs(ref, x)):
        np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


def test_googlenet_aux_heads_convert_and_match_torchvision_in_training(tmp_path):
    ref = torchvision_reference("googlenet", 224, aux_logits=True, transform_input=False,
                                dropout=0.0, dropout_aux=0.0)
    path = save_state_dict(ref, tmp_path / "googlenet_aux.pth")
    _, variables = convert_file("torchvision", path, "googlenet")
    assert not {"aux1", "aux2"} & set(variables["params"])  # untrained in torchvision's weights

    model = models.create("googlenet", num_classes=1000, aux_logits=True, dropout=0.0,
                          aux_dropout=0.0)
    shapes = {p: s.shape for p, s in tree.flatten(models.variable_shapes(model, 224)).items()}
    rules = tv.family_of("googlenet").rules("googlenet")
    converted = common.convert_torch(common.read_state_dict(path), rules)  # keeps aux1, aux2
    variables = common.fit_to(shapes, converted, str(path), "googlenet with aux heads")
    x = reference.random_images(160)
    outputs = flax_train_outputs(model, variables, x)
    assert len(outputs) == 3  # GoogLeNetOutputs(logits, aux_logits2, aux_logits1)
    for ours, theirs in zip(outputs, torch_train_outputs(ref, x)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,aux_logits,size,features", [
    ("googlenet", True, 64, 1024), ("googlenet", False, 15, 1024),
    ("inception_v3", True, 75, 2048), ("inception_v3", False, 75, 2048)])
def test_blocks_and_pre_logits(arch, aux_logits, size, features):
    model = models.create(arch, num_classes=10, aux_logits=aux_logits)
    assert reference.creation_order(model, size) == tuple(model.blocks)
    variables = models.variable_shapes(model, size)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    pooled = jax.eval_shape(lambda v, x: model.apply(v, x, pre_logits=True), variables, x)
    assert pooled.shape == (2, features)


def train_step_shapes(model, variables, size: int):
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}),
        variables, x)


def test_inception_v3_trains_small_inputs_only_without_aux_head():
    # The numerics of training mode are tested against torchvision above; this traces it only.
    model = models.create("inception_v3", num_classes=10)
    variables = models.variable_shapes(model, 75)  # eval-mode init admits small inputs
    with pytest.raises(ValueError, match="aux_logits=False"):
        train_step_shapes(model, variables, 75)
    model = model.clone(aux_logits=False)
    logits, updates = train_step_shapes(model, models.variable_shapes(model, 75), 75)
    assert logits.shape == (2, 10) and "Mixed_7c" in updates["batch_stats"]


def test_wrong_state_dict_lists_paths(tmp_path):
    torch = reference.torch_or_skip()
    import torchvision
    path = tmp_path / "googlenet.pth"
    torch.save(torchvision.models.googlenet(weights=None, aux_logits=False,
                                            init_weights=False).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"(?s)missing.*Mixed_5b.*unexpected.*inception3a"):
        convert_file("torchvision", path, "inception_v3")
