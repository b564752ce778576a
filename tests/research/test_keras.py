"""Converted Keras weights against ``keras.applications`` (JAX backend), end to end: raw RGB
images in [0, 255] through the checkpoint's preprocessing and the converted model, against
Keras's ``preprocess_input`` and the Keras model. The Keras models have random weights and
biases, BatchNorm statistics measured on the test images' distribution, and no softmax; they
compute in float64 (but for Keras's BatchNorm, which computes in float32 regardless): nearly
the exact answer that float32 implementations approximate to about 1e-4 in deep networks.
Building a Keras model compiles an initialiser per weight shape, so every such test is slow."""

import contextlib
import os

import h5py
import jax
import numpy as np
import pytest

from research import convert, preprocess, pretrained
from research.convert import common, convert_file, keras_mobilenet
from research.convert import keras as keras_convert
from research.errors import CheckpointError

# arch: (keras.applications builder, its module, another size it admits, file layout)
APPS = {
    "vgg16": ("VGG16", "vgg16", 64, "weights.h5"),
    "vgg19": ("VGG19", "vgg19", 64, "downloadable.h5"),
    "resnet50": ("ResNet50", "resnet", 128, "model.h5"),
    "resnet101": ("ResNet101", "resnet", 96, "weights.h5"),
    "resnet152": ("ResNet152", "resnet", 64, "weights.h5"),
    "inception_v3": ("InceptionV3", "inception_v3", 139, "downloadable.h5"),
    "xception": ("Xception", "xception", 99, "weights.h5"),
    "mobilenet_v1": ("MobileNet", "mobilenet", 75, "downloadable.h5"),
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2", 75, "weights.h5"),
    "mobilenet_v3_small": ("MobileNetV3Small", "mobilenet_v3", 75, "model.h5"),
    "mobilenet_v3_large": ("MobileNetV3Large", "mobilenet_v3", 75, "weights.h5"),
    **{f"efficientnet_b{i}": (f"EfficientNetB{i}", "efficientnet", 75, "weights.h5")
       for i in range(8)},
}
# Networks with depthwise convolutions are compared at their smaller size only: XLA runs float64
# depthwise convolutions through its generic grouped convolution, minutes per model at 224 px.
AT_OTHER_SIZE_ONLY = {"xception", *(arch for arch in APPS if arch.startswith(
    ("mobilenet", "efficientnet")))}
# VGG16 is also compared at its other size, through pooled features.
AT_BOTH_SIZES = {"vgg16"}
# (arch, the Keras builder's variant options): every arch, and the variants the file decides.
# Each case takes a minute or two (Keras compiles its float64 model piece by piece): CI runs
# one per family and two variants; the others are marked exhaustive (`make test-all`).
VARIANTS = [("mobilenet_v1", dict(alpha=0.25)), ("mobilenet_v2", dict(alpha=0.35)),
            ("mobilenet_v3_small", dict(minimalistic=True)),
            ("mobilenet_v3_large", dict(alpha=0.75, minimalistic=True))]
IN_CI = {("vgg16", ()), ("resnet50", ()), ("inception_v3", ()), ("xception", ()),
         ("mobilenet_v1", ()), ("mobilenet_v2", ()), ("mobilenet_v3_small", ()),
         ("efficientnet_b0", ()), ("mobilenet_v1", (("alpha", 0.25),)),
         ("mobilenet_v3_large", (("alpha", 0.75), ("minimalistic", True)))}


def _case(arch: str, variant: dict):
    exhaustive = (arch, tuple(variant.items())) not in IN_CI
    marks = (pytest.mark.slow, pytest.mark.exhaustive) if exhaustive else (pytest.mark.slow,)
    name = ",".join(f"{k}={v}" for k, v in variant.items()) or "default"
    return pytest.param(arch, variant, marks=marks, id=f"{arch}-{name}")


CASES = [_case(arch, {}) for arch in APPS] + [_case(arch, v) for arch, v in VARIANTS]


def keras_or_skip():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras", reason="the Keras reference tests need keras")
    if keras.backend.backend() != "jax":
        pytest.skip("the Keras reference tests need KERAS_BACKEND=jax")
    return keras


@contextlib.contextmanager
def keras_float64():
    keras = keras_or_skip()
    previous = keras.config.floatx()
    with jax.enable_x64(True):
        keras.config.set_floatx("float64")
        try:
            yield
        finally:
            keras.config.set_floatx(previous)


def keras_builder(arch: str):
    keras = keras_or_skip()
    builder, module, _, _ = APPS[arch]
    return (getattr(keras.applications, builder),
            getattr(keras.applications, module).preprocess_input)


def raw_images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3))


def randomise(keras_model, images: np.ndarray, seed: int = 0) -> None:
    """Random biases, BatchNorm γ/β and input Normalization statistics (EfficientNet's), and
    BatchNorm statistics of ``images`` (one batch in training mode with momentum 0,
    jit-compiled), as tests.reference does for torch models.

    A ResNet's residual branches end in a BatchNorm (``_3_bn``) whose γ is small, as in trained
    ResNets: with γ ~ U(0.5, 1) there, ResNet-152's residual stream grows to ~20 and float32's
    own error (ours and Keras's alike) reaches 1e-3."""
    keras = keras_or_skip()
    rng = np.random.default_rng(seed)
    norms = [layer for layer in keras_model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in keras_model.layers:
        if layer in norms:
            n = layer.moving_mean.shape
            if layer.gamma is not None:
                low, high = (0.1, 0.3) if layer.name.endswith("_3_bn") else (0.5, 1.0)
                layer.gamma.assign(rng.uniform(low, high, n))
            layer.beta.assign(rng.normal(0.0, 0.1, n))
        elif isinstance(layer, keras.layers.Normalization):
            layer.adapt_mean.assign(rng.uniform(0.3, 0.6, 3))
            layer.adapt_variance.assign(rng.uniform(0.03, 0.09, 3))
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 0.1, layer.bias.shape))
    finalize_normalization(keras_model)
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    measure = jax.jit(lambda trainable, other, x: keras_model.stateless_call(
        trainable, other, x, training=True)[1])
    values = measure([v.value for v in keras_model.trainable_variables],
                     [v.value for v in keras_model.non_trainable_variables], images)
    for variable, value in zip(keras_model.non_trainable_variables, values):
        variable.assign(value)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


def finalize_normalization(keras_model) -> None:
    """Normalization layers compute from their statistics when built or loaded, not when set."""
    keras = keras_or_skip()
    for layer in keras_model.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()


def save(keras_model, path, layout: str) -> None:
    if layout == "weights.h5":
        keras_model.save_weights(path)
    elif layout == "model.h5":
        keras_model.save(path)
    else:
        write_downloadable(keras_model, path)


def write_downloadable(keras_model, path) -> None:
    """The layout of keras.applications' downloadable weights (Keras 2's ``save_weights``):
    a group per layer, ``layer_names`` and ``weight_names`` attributes, ``:0`` suffixes."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in keras_model.layers]
        for layer in keras_model.layers:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            group.attrs["weight_names"] = [name.encode() for name in names]
            for name, weight in zip(names, layer.weights):
                group[name] = np.asarray(weight.value)


@pytest.mark.parametrize("arch,variant", CASES)
def test_logits_match_keras(arch, variant, tmp_path):
    for ours, expected in outputs_and_keras(arch, variant, tmp_path):
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def outputs_and_keras(arch: str, variant: dict, directory) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ours, Keras's) at the default size through a converted checkpoint, and, for
    ``AT_BOTH_SIZES``, at another size (pooled features for VGG) with its
    preprocessing at that size; ``AT_OTHER_SIZE_ONLY`` at the other size alone."""
    build, preprocess_input = keras_builder(arch)
    _, _, other_size, layout = APPS[arch]
    default_size = keras_convert.preprocessing(arch)["input_size"]
    size = other_size if arch in AT_OTHER_SIZE_ONLY else default_size
    x, x_other = raw_images(size), raw_images(other_size)
    vgg = arch.startswith("vgg")  # Keras's VGG flattens a 7×7 map: compare pooled features
    keras_or_skip().utils.set_random_seed(0)  # the same random weights every run
    with keras_float64():
        ref = build(weights=None, classifier_activation=None, input_shape=(size, size, 3),
                    **variant)
        randomise(ref, preprocess_input(raw_images(size, batch=4, seed=1)))
        path = directory / f"{arch}.{layout}"
        save(ref, path, layout)
        expected = ref.predict(preprocess_input(x.copy()), verbose=0)
        both = size != other_size and arch in AT_BOTH_SIZES and not variant
        if both:
            top = dict(include_top=False, pooling="avg") if vgg else dict(
                classifier_activation=None)
            other = build(weights=None, input_shape=(other_size, other_size, 3), **top,
                          **variant)
            other.set_weights(ref.get_weights()[:len(other.weights)])
            finalize_normalization(other)
            expected_other = other.predict(preprocess_input(x_other.copy()), verbose=0)

    loaded = convert_to_checkpoint(arch, path, directory / "checkpoint")
    assert loaded.meta["preprocess"]["input_size"] == default_size
    inputs = preprocess.apply(x, {**loaded.meta["preprocess"], "input_size": size})
    pairs = [(np.asarray(loaded.model.apply(loaded.variables, inputs, train=False)), expected)]
    if not both:
        return pairs
    inputs = preprocess.apply(x_other, {**loaded.meta["preprocess"], "input_size": other_size})
    if vgg:
        ours = pooled_block5(loaded.model, loaded.variables, inputs)
    else:
        ours = loaded.model.apply(loaded.variables, inputs, train=False)
    return pairs + [(np.asarray(ours), expected_other)]


def convert_to_checkpoint(arch: str, path, directory) -> pretrained.Pretrained:
    """What ``scripts.convert`` writes, with the options and preprocessing read from the file
    (MobileNet's α, EfficientNet's normalisation)."""
    _, variables, meta = convert.convert("keras", arch, path)
    return pretrained.load(convert.write(directory, variables, meta))


def pooled_block5(model, variables, inputs):
    """VGG's last max-pooled feature map, globally averaged (Keras's ``pooling="avg"``)."""
    _, state = model.apply(variables, inputs, train=False,
                           capture_intermediates=lambda module, _: module.name == "block5")
    return state["intermediates"]["block5"]["__call__"][0].mean(axis=(1, 2))


# Files that do not fit: each a CheckpointError naming the file and the problem.


def write_legacy(path, weights: dict[str, dict[str, np.ndarray]]) -> None:
    """A legacy weights file of ``{layer: {variable: array}}``, written with h5py alone."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.encode() for layer in weights]
        for layer, variables in weights.items():
            names = [f"{layer}/{name}:0" for name in variables]
            f.create_group(layer).attrs["weight_names"] = [name.encode() for name in names]
            for name, value in zip(names, variables.values()):
                f[layer][name] = value


def test_truncated_h5_names_the_file(tmp_path):
    path = tmp_path / "xception.h5"
    write_legacy(path, {"block1_conv1": {"kernel": np.zeros((3, 3, 3, 32), np.float32)},
                        "predictions": {"kernel": np.zeros((2048, 1000), np.float32)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as error:
        convert_file("keras", path, "xception")
    assert str(path) in str(error.value)


def test_h5_of_another_architecture_lists_paths(tmp_path):
    build, _ = keras_builder("vgg16")
    path = tmp_path / "vgg16_notop.weights.h5"
    build(weights=None, include_top=False).save_weights(path)
    with pytest.raises(CheckpointError) as error:
        convert_file("keras", path, "vgg19")
    message = str(error.value)
    assert str(path) in message and "does not fit transferlab's vgg19" in message
    assert "params/block3/conv4/kernel" in message and "params/head/kernel" in message


def test_keras3_file_without_layer_names_is_refused(tmp_path):
    path = tmp_path / "old.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/conv2d/vars/0", data=np.zeros((3, 3, 3, 32), np.float32))
    with pytest.raises(CheckpointError, match="carries no name") as error:
        keras_convert.read(path)
    assert str(path) in str(error.value)


def test_auto_named_layers_map_by_creation_order(tmp_path):
    """Xception's unnamed shortcut convs, numbered as a session left them (and Keras 2's
    1-based count), are the downsampling blocks' in creation order."""
    path = tmp_path / "shortcuts.h5"
    write_legacy(path, {f"conv2d_{k}": {"kernel": np.full((1, 1, 1, 1), k, np.float32)}
                        for k in (97, 98, 99, 100)})
    weights = keras_convert.read(path)
    assert sorted(weights) == [f"conv2d_{k}/kernel" for k in range(4)]
    assert weights["conv2d_0/kernel"].item() == 97 and weights["conv2d_3/kernel"].item() == 100


def test_efficientnet_imagenet_normalization_is_imagenet_preprocessing(tmp_path):
    """Keras's ImageNet EfficientNets store the standard deviations as the Normalization
    layer's variances and divide once more by their square roots: ImageNet mean and std."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    path = tmp_path / "efficientnetb0.h5"
    write_legacy(path, {"normalization": {"mean": np.array(mean), "variance": np.array(std),
                                          "count": np.array(0)}})
    spec = keras_convert.preprocessing("efficientnet_b0", keras_convert.read(path))
    assert spec["mean"] == pytest.approx([255 * m for m in mean])
    assert spec["std"] == pytest.approx([255 * s for s in std])


@pytest.mark.parametrize("keras2,keras3,ours", [
    ("Conv/BatchNorm/gamma", "conv_bn/gamma", "stem/bn/gamma"),
    ("expanded_conv/depthwise/depthwise_kernel", "expanded_conv_depthwise/kernel",
     "block1/depthwise/conv/depthwise_kernel"),
    ("expanded_conv_3/squeeze_excite/Conv_1/bias", "expanded_conv_3_squeeze_excite_conv_1/bias",
     "block4/se/expand/bias"),
    ("expanded_conv_10/project/BatchNorm/moving_mean", "expanded_conv_10_project_bn/moving_mean",
     "block11/project/bn/moving_mean"),
    ("Conv_1/kernel", "conv_1/kernel", "features_last/conv/kernel"),
    ("Conv_2/kernel", "conv_2/kernel", "pre_head/kernel"),
    ("Logits/bias", "logits/bias", "head/bias")])
def test_mobilenet_v3_published_names_map_as_keras3_names(keras2, keras3, ours):
    """The downloadable MobileNetV3 weights keep Keras 2's layer names."""
    rules = keras_mobilenet.rules("mobilenet_v3_large")
    assert common.rename(keras2, rules) == common.rename(keras3, rules) == ours
