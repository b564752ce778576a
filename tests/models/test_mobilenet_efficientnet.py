import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.mobilenet import BlockSpec, InvertedResidual
from research import tree
from research.convert import common, convert_file
from research.convert import torchvision as tv
from research.errors import CheckpointError
from tests import reference

PARAM_COUNTS = {  # published, 1000 classes (Keras's trainable count for MobileNetV1)
    "mobilenet_v1": 4_231_976, "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032, "mobilenet_v3_small": 2_542_856,
    "efficientnet_b0": 5_288_548, "efficientnet_b1": 7_794_184, "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232, "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784, "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}
PRE_LOGITS = {
    "mobilenet_v1": 1024, "mobilenet_v2": 1280, "mobilenet_v3_large": 1280,
    "mobilenet_v3_small": 1024, "efficientnet_b0": 1280, "efficientnet_b1": 1280,
    "efficientnet_b2": 1408, "efficientnet_b3": 1536, "efficientnet_b4": 1792,
    "efficientnet_b5": 2048, "efficientnet_b6": 2304, "efficientnet_b7": 2560,
}
TORCHVISION = [arch for arch in PARAM_COUNTS if arch != "mobilenet_v1"]
SMALL = 75  # odd, so that strided layers see odd sizes
# The other cases take over ~20 s (B1–B7 differ from B0 only in the numbers that the parameter
# counts check, and in B5–B7's BatchNorm epsilon).
QUICK_LOGITS = {("mobilenet_v2", SMALL), ("mobilenet_v2", 224), ("mobilenet_v3_large", SMALL),
                ("mobilenet_v3_large", 224), ("mobilenet_v3_small", SMALL),
                ("mobilenet_v3_small", 224), ("efficientnet_b0", SMALL)}


@pytest.mark.parametrize("arch", PARAM_COUNTS)
def test_param_count(arch):
    model = models.create(arch, num_classes=1000)
    assert reference.param_count(model, 32) == PARAM_COUNTS[arch]


def _converted(arch: str, calibration_size: int, directory):
    """torchvision's ``arch`` with BatchNorm statistics measured at ``calibration_size``, and
    its conversion. (Calibrated at 64×64, EfficientNet-B0's logits at 224×224 reach ~1e3: too
    large for float32 to meet atol 1e-4.)"""
    torch = reference.torch_or_skip()
    import torchvision
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None)
    reference.randomise_batchnorm(ref, image_size=calibration_size)
    path = directory / f"{arch}.pth"
    torch.save(ref.state_dict(), path)
    model, variables = convert_file("torchvision", path, arch)
    return ref, model, variables


def _logit_cases():
    """Every architecture at 75×75 and at its default resolution (calibrated at 224: cheaper
    than at 600, and as good)."""
    cases = []
    for arch in TORCHVISION:
        for size, calibration_size in [(SMALL, SMALL), (models.model_info(arch).input_size, 224)]:
            slow = () if (arch, size) in QUICK_LOGITS else (pytest.mark.slow,)
            cases.append(pytest.param(arch, size, calibration_size, id=f"{arch}-{size}",
                                      marks=slow))
    return cases


def _assert_logits_match(ours, ref, message):
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0, err_msg=message)
    # Tiny logits (torchvision initialises MobileNet heads with std 0.01) pass any atol.
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max(), message


@pytest.mark.parametrize("arch,size,calibration_size", _logit_cases())
def test_logits_match_torchvision(arch, size, calibration_size, tmp_path):
    ref, model, variables = _converted(arch, calibration_size, tmp_path)
    x = reference.random_images(size)
    _assert_logits_match(reference.flax_logits(model, variables, x),
                         reference.torch_logits(ref, x), f"{arch} at {size}×{size}")


def _timm_mobilenet_v1_rules(stage_depths):
    """timm's ``blocks.<stage>.<j>`` numbered as Keras's ``block1`` … ``block13``."""
    rules, index = [(r"^conv_stem\.", "stem.conv."), (r"^bn1\.", "stem.bn.")], 1
    for stage, depth in enumerate(stage_depths):
        for j in range(depth):
            rules.append((rf"^blocks\.{stage}\.{j}\.", f"block{index}."))
            index += 1
    return (*rules, (r"\.conv_dw\.", ".depthwise.conv."), (r"\.bn1\.", ".depthwise.bn."),
            (r"\.conv_pw\.", ".pointwise.conv."), (r"\.bn2\.", ".pointwise.bn."),
            (r"^classifier\.", "head."))


def test_mobilenet_v1_with_torch_padding_matches_timm():
    """timm's mobilenetv1_100 is Keras's layout with PyTorch's padding and BatchNorm."""
    torch = reference.torch_or_skip()
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("mobilenetv1_100", pretrained=False)
    reference.randomise_batchnorm(ref, image_size=SMALL)
    model = models.create("mobilenet_v1", num_classes=1000, padding="torch",
                          bn_eps=1e-5, bn_momentum=0.9)
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    converted = common.convert_torch(state_dict, _timm_mobilenet_v1_rules((1, 2, 2, 6, 2)))
    shapes = {p: s.shape for p, s in tree.flatten(models.variable_shapes(model, SMALL)).items()}
    variables = common.fit_to(shapes, converted, "timm", "mobilenet_v1")
    x = reference.random_images(SMALL)
    _assert_logits_match(reference.flax_logits(model, variables, x),
                         reference.torch_logits(ref, x), "mobilenet_v1")


@pytest.mark.parametrize("source,target,paths", [
    ("mobilenet_v3_small", "mobilenet_v3_large",
     ("params/block12/expand/conv/kernel",  # missing
      "batch_stats/features/12/bn/mean",  # unexpected: small's features_last
      "params/block11/depthwise/bn/scale: (576,)")),  # mis-shaped
    ("efficientnet_b0", "efficientnet_b1", ("params/stage1/block1/depthwise/conv/kernel",)),
])
def test_state_dict_of_another_variant_does_not_fit(source, target, paths):
    reference.torch_or_skip()
    import torchvision
    ref = getattr(torchvision.models, source)(weights=None)
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        tv.convert_weights(state_dict, target)
    for path in paths:
        assert path in str(err.value)


@pytest.mark.parametrize("arch", PARAM_COUNTS)
def test_blocks_are_the_parameters_in_forward_order(arch):
    model = models.create(arch, num_classes=10)
    size = models.model_info(arch).min_size
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    assert reference.creation_order(model, size) == tuple(model.blocks)
    variables = models.variable_shapes(model, size)
    features = jax.eval_shape(functools.partial(model.apply, pre_logits=True), variables, x)
    assert features.shape == (2, PRE_LOGITS[arch])


def _train_step(model):
    """Training-mode logits and batch statistics for a given "dropout" rng seed."""
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    return lambda variables, x, seed: apply(variables, x, rngs={"dropout": jax.random.key(seed)})


def _assert_batch_stats_updated(variables, updates):
    old, new = tree.flatten(variables["batch_stats"]), tree.flatten(updates["batch_stats"])
    assert old.keys() == new.keys()
    assert any(not np.allclose(old[p], new[p]) for p in old)


@pytest.mark.parametrize("arch", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small",
                                  "efficientnet_b0"])
def test_train_mode_uses_dropout_and_batch_stats(arch):
    model = models.create(arch, num_classes=10, in_chans=1, dropout=0.5)
    variables = models.init_variables(model, jax.random.key(0), 32)
    x = reference.random_images(32, channels=1)
    train = _train_step(model)
    (logits, updates), (other, _) = train(variables, x, 1), train(variables, x, 2)
    assert logits.shape == (2, 10)
    assert not np.allclose(logits, other)
    _assert_batch_stats_updated(variables, updates)


@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_inverted_residual_drops_its_branch_only_while_training(drop_path):
    block = InvertedResidual(BlockSpec(16, 16, 32, se_channels=4, drop_path=drop_path))
    x = reference.random_images(8, batch=8, channels=16)
    variables = block.init(jax.random.key(0), x)
    train = _train_step(block)
    assert np.allclose(train(variables, x, 1)[0], train(variables, x, 2)[0]) == (drop_path == 0)
    assert block.apply(variables, x).shape == x.shape  # evaluation needs no "dropout" rng


def test_efficientnet_stochastic_depth_rises_linearly_over_blocks():
    model = models.create("efficientnet_b0", num_classes=10)
    rates = [spec.drop_path for specs in model.stage_specs() for spec in specs]
    np.testing.assert_allclose(rates, [0.2 * k / 16 for k in range(16)])
