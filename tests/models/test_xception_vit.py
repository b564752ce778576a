import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import vit
from research import tree
from research.convert import common, convert_file
from research.convert import torchvision as tv
from research.errors import CheckpointError
from tests import reference

VIT_PARAMS = {"vit_ti16": 5_717_416, "vit_s16": 22_050_664, "vit_s32": 22_878_952,
              "vit_b16": 86_567_656, "vit_b32": 88_224_232, "vit_l16": 304_326_632,
              "vit_l32": 306_535_400}


def check_train_mode(model, variables, x):
    logits, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)},
                                  mutable=["batch_stats"])
    assert logits.shape == (x.shape[0], model.num_classes)
    assert not np.allclose(logits, model.apply(variables, x, train=False))
    return updates


# Xception


@pytest.fixture(scope="module")
def xception():
    model = models.create("xception", num_classes=10, dropout=0.5)
    return model, models.init_variables(model, jax.random.key(0), 71)


def test_xception_param_count():
    assert reference.param_count(models.create("xception", num_classes=1000), 299) == 22_855_952


def test_xception_blocks_and_forward(xception):
    model, variables = xception
    assert reference.creation_order(model, 71) == tuple(model.blocks)
    logits, state = model.apply(variables, reference.random_images(299),
                                capture_intermediates=True)
    assert logits.shape == (2, 10)
    sizes = {name: state["intermediates"][name]["__call__"][0].shape[1:]
             for name in ("block1", "block2", "block4", "block12", "block13", "block14")}
    assert sizes == {"block1": (147, 147, 64), "block2": (74, 74, 128), "block4": (19, 19, 728),
                     "block12": (19, 19, 728), "block13": (10, 10, 1024),
                     "block14": (10, 10, 2048)}  # as Keras's summary
    assert model.apply(variables, reference.random_images(71), pre_logits=True).shape == (2, 2048)


def test_xception_train_mode(xception):
    model, variables = xception
    updates = check_train_mode(model, variables, reference.random_images(71))
    old, new = tree.flatten(variables["batch_stats"]), tree.flatten(updates["batch_stats"])
    assert old.keys() == new.keys()
    assert not np.allclose(old["block2/residual_bn/mean"], new["block2/residual_bn/mean"])


# Vision Transformers


@pytest.mark.parametrize("arch", sorted(VIT_PARAMS))
def test_vit_param_count(arch):
    assert reference.param_count(models.create(arch, num_classes=1000), 224) == VIT_PARAMS[arch]


@pytest.fixture(scope="module")
def vit_ti():
    """ViT-Ti/16 for 32×48 inputs: any multiple of the patch size works, not only squares."""
    model = models.create("vit_ti16", num_classes=10, dropout=0.1, attention_dropout=0.1,
                          encoder_dropout=0.1)
    x = np.random.default_rng(0).standard_normal((2, 32, 48, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    head = variables["params"]["head"]
    head["kernel"] = head["kernel"] + 0.1  # it starts at zero, as torchvision's
    return model, variables, x


def test_vit_blocks_and_forward(vit_ti):
    model, variables, x = vit_ti
    assert reference.creation_order(model, 16) == tuple(model.blocks)
    assert model.blocks[1:3] == ("block00", "block01") and len(model.blocks) == 15
    assert variables["params"]["embed"]["pos_embedding"].shape == (1, 2 * 3 + 1, 192)
    assert model.apply(variables, x).shape == (2, 10)
    assert model.apply(variables, x, pre_logits=True).shape == (2, 192)
    with pytest.raises(ValueError, match="learned for 6 patches, but this input has 2×2"):
        model.apply(variables, reference.random_images(32))


def test_vit_attention_dropout_applies_in_training_only(vit_ti):
    model, variables, x = vit_ti
    attention_only = model.clone(dropout=0.0, encoder_dropout=0.0)
    features = lambda model, **kw: model.apply(variables, x, pre_logits=True, **kw)
    train = lambda key: features(attention_only, train=True,
                                 rngs={"dropout": jax.random.key(key)})
    assert not np.allclose(train(1), train(2), atol=1e-3)
    without = attention_only.clone(attention_dropout=0.0)
    np.testing.assert_allclose(features(without, train=True), features(attention_only),
                               atol=1e-5)


def test_vit_train_mode(vit_ti):
    model, variables, x = vit_ti
    check_train_mode(model, variables, x)


def test_vit_class_token_only_block_is_the_full_blocks_first_token():
    full = vit.EncoderBlock(num_heads=3, mlp_dim=96)
    x = np.random.default_rng(0).standard_normal((2, 7, 24)).astype(np.float32)
    variables = full.init(jax.random.key(0), x)
    first = full.clone(class_token_only=True)
    weights = np.random.default_rng(1).standard_normal((2, 1, 24)).astype(np.float32)

    def loss_and_grads(block, first_token):
        loss = lambda v, x: jnp.sum(first_token(block.apply(v, x, train=True)) * weights)
        return jax.value_and_grad(loss, argnums=(0, 1))(variables, x)

    assert first.apply(variables, x).shape == (2, 1, 24)
    (expected, expected_grads) = loss_and_grads(full, lambda y: y[:, :1])
    (loss, grads) = loss_and_grads(first, lambda y: y)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    expected_param_grads = tree.flatten(expected_grads[0])
    for path, grad in tree.flatten(grads[0]).items():
        np.testing.assert_allclose(grad, expected_param_grads[path], atol=1e-5, err_msg=path)
    np.testing.assert_allclose(grads[1], expected_grads[1], atol=1e-5)
    assert np.abs(grads[1][:, 1:]).max() > 1e-3  # the other tokens are keys and values


def convert(path, arch: str, image_size: int):
    """``convert_file`` fits the registered input size (224); the position embedding of a
    reference built for another size needs the shapes of that size."""
    if image_size == models.model_info(arch).input_size:
        return convert_file("torchvision", path, arch)
    family = tv.family_of(arch)
    model = models.create(arch, num_classes=1000)
    converted = common.convert_torch(common.read_state_dict(path), family.rules(arch),
                                     family.special)
    shapes = tree.flatten(models.variable_shapes(model, image_size))
    shapes = {p: s.shape for p, s in shapes.items()}
    return model, common.fit_to(shapes, converted, str(path), arch)


VIT_CASES = [("vit_b16", 224), ("vit_b16", 64), ("vit_b32", 224), ("vit_b32", 96),
             *(pytest.param(arch, size, marks=pytest.mark.slow)  # ViT-L: large models
               for arch, size in [("vit_l16", 224), ("vit_l16", 64), ("vit_l32", 224),
                                  ("vit_l32", 96)])]


@pytest.mark.parametrize("arch,size", VIT_CASES)
def test_vit_logits_match_torchvision(arch, size, tmp_path):
    torch = reference.torch_or_skip()
    import torchvision
    torch.manual_seed(0)
    ref = getattr(torchvision.models, models.model_info(arch).torchvision)(weights=None,
                                                                           image_size=size)
    reference.randomise_constants(ref)  # no BatchNorm to randomise
    path = tmp_path / f"{arch}.pth"
    torch.save(ref.state_dict(), path)
    model, variables = convert(path, arch, size)
    x = reference.random_images(size)
    np.testing.assert_allclose(reference.flax_logits(model, variables, x),
                               reference.torch_logits(ref, x), atol=1e-4, rtol=0)


def test_vit_rejects_another_variant(tmp_path):
    torch = reference.torch_or_skip()
    from torchvision.models.vision_transformer import VisionTransformer
    ref = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                            hidden_dim=64, mlp_dim=128)
    path = tmp_path / "tiny_vit.pth"
    torch.save(ref.state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        convert_file("torchvision", path, "vit_b16")
    message = str(error.value)
    assert "missing (" in message and "params/block02/attn/query/kernel" in message
    assert "params/embed/patch/kernel: (16, 16, 3, 64)" in message  # mis-shaped
