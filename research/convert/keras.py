"""Keras weights (``keras.applications``' layouts) → transferlab variables, read with h5py alone.

Two file layouts are read:

- Keras 3's ``model.save_weights("x.weights.h5")``: ``layers/<class>_<n>/vars/<i>``, each
  ``vars`` group naming its layer in a ``name`` attribute;
- legacy HDF5: ``model.save("x.h5")`` and the downloadable ``keras.applications`` files, one
  group per layer (under ``model_weights`` for a whole model) in the order of the
  ``layer_names`` attribute, each listing its variables in ``weight_names``.

Both give ``{"<layer>/<variable>": array}`` in Keras's own names (``conv1_bn/gamma``). Layers
Keras names automatically (``conv2d_12``, ``batch_normalization_12``: all of InceptionV3's,
Xception's shortcuts) are renumbered by creation order from 0, whatever the session's count was
when they were built, and mapped by that order.

Each family module ``research/convert/keras_<family>.py`` defines ``ARCHS``, ``OPTIONS`` (per
arch), ``PREPROCESSING`` (the ``preprocess_input`` convention) and ``rules(arch)``: ordered regex
renames from those keys to our module paths plus the Keras variable name
(``stage1/block0/bn1/gamma``); optionally ``special(renamed_key, value)`` for tensors with no
generic rule, ``infer_options(arch, renamed)`` for variants read off the renamed weights'
shapes (MobileNet's α) and ``preprocessing(weights)`` for normalisation layers in the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import models
from research import tree
from research.convert import common
from research.errors import CheckpointError

FAMILIES = ("vgg", "resnet", "inception", "xception", "mobilenet", "efficientnet")

# keras.applications' preprocess_input modes on the 0–255 scale.
CAFFE = dict(mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), channel_order="BGR")
TF = dict(mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), channel_order="RGB")

# Keras's variable names → (collection, Flax leaf). A depthwise kernel (kh, kw, C, m) becomes a
# grouped convolution's (kh, kw, 1, C·m); the rules name it ``depthwise_kernel``.
_LEAVES = {
    "kernel": ("params", "kernel"),
    "depthwise_kernel": ("params", "kernel"),
    "pointwise_kernel": ("params", "kernel"),
    "bias": ("params", "bias"),
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}

# A Keras 3 file numbers a layer's variables; their names by layer class. BatchNormalization
# leaves out its optional γ and β from the front (keras.applications only drops γ), the others
# their optional bias from the end.
_KERAS3_VARIABLES = {
    "conv2d": ("kernel", "bias"),
    "dense": ("kernel", "bias"),
    "depthwise_conv2d": ("kernel", "bias"),
    "separable_conv2d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "normalization": ("mean", "variance", "count"),
}

_AUTO_NAME = re.compile(r"^(conv2d|batch_normalization)(?:_(\d+))?$")


def family_of(arch: str):
    return common.family_of("keras", FAMILIES, arch)


def supported() -> list[str]:
    modules = common.family_modules("keras", FAMILIES)
    return [arch for module in modules for arch in module.ARCHS]


# ----------------------------------------------------------------------------- reading


def read(path: str | Path) -> dict[str, np.ndarray]:
    """``{"<layer>/<variable>": array}`` from a Keras 3 ``.weights.h5`` or a legacy ``.h5``."""
    import h5py
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. Pass the path of a Keras .h5 or "
                              ".weights.h5 file.")
    try:
        with h5py.File(path, "r") as f:
            datasets = _keras3_datasets(f, path) if _is_keras3(f) else _legacy_datasets(f, path)
            weights = {key: np.asarray(d) for key, d in datasets.items()}
    except (OSError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable Keras HDF5 file ({e}). It may be "
                              "truncated: download or save it again.") from None
    return _renumber_auto_names(weights)


def _is_keras3(f) -> bool:
    return "layers" in f and "layer_names" not in f.attrs and "model_weights" not in f


def _keras3_datasets(f, path: Path) -> dict:
    out = {}
    for key, group in f["layers"].items():
        variables = group.get("vars")
        if variables is None or not len(variables):
            continue
        if "name" not in variables.attrs:
            raise CheckpointError(
                f"{path}: layer {key!r} carries no name (the file was written by an older "
                "Keras 3), so its weights cannot be matched. Load it in Keras and save it again "
                "with a recent Keras 3 (model.save_weights), or as legacy .h5 (model.save).")
        layer_class = re.sub(r"_\d+$", "", key)
        names = _keras3_variable_names(layer_class, len(variables), path, key)
        for index, name in enumerate(names):
            out[f"{_text(variables.attrs['name'])}/{name}"] = variables[str(index)]
    return out


def _keras3_variable_names(layer_class: str, count: int, path: Path, key: str):
    names = _KERAS3_VARIABLES.get(layer_class)
    if names is None or count > len(names):
        raise CheckpointError(f"{path}: layer {key!r} ({layer_class} with {count} variables) "
                              "is not one keras.applications models use.")
    return names[len(names) - count:] if layer_class == "batch_normalization" else names[:count]


def _legacy_datasets(f, path: Path) -> dict:
    root = f["model_weights"] if "model_weights" in f else f
    layer_names = _attribute_list(root, "layer_names")
    if not layer_names:
        raise CheckpointError(f"{path} holds no Keras weights: neither Keras 3's layers/…/vars "
                              "groups nor a legacy layer_names attribute.")
    out = {}
    for layer in layer_names:
        group = root[layer]
        for weight in _attribute_list(group, "weight_names"):
            variable = weight.rsplit("/", 1)[-1].split(":")[0]  # "conv1_bn/gamma:0" → "gamma"
            out[f"{layer}/{variable}"] = group[weight]
    return out


def _attribute_list(group, name: str) -> list[str]:
    """A list attribute, which Keras splits into ``name0``, ``name1``, … when it is large."""
    if name in group.attrs:
        return [_text(v) for v in group.attrs[name]]
    chunks = []
    while f"{name}{len(chunks)}" in group.attrs:
        chunks.append(group.attrs[f"{name}{len(chunks)}"])
    return [_text(v) for chunk in chunks for v in chunk]


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _renumber_auto_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``conv2d_94``, ``conv2d_95``, … (or Keras 2's 1-based names) → ``conv2d_0``, … in the
    order Keras created them, per layer class."""
    layers = {key.split("/", 1)[0] for key in weights}
    ranks = {}
    for layer_class in ("conv2d", "batch_normalization"):
        auto = [(int(m[2] or 0), name) for name in layers
                if (m := _AUTO_NAME.match(name)) and m[1] == layer_class]
        ranks.update({name: f"{layer_class}_{rank}" for rank, (_, name) in enumerate(sorted(auto))})
    return {_ranked(key, ranks): value for key, value in weights.items()}


def _ranked(key: str, ranks: dict[str, str]) -> str:
    layer, variable = key.split("/", 1)
    return f"{ranks.get(layer, layer)}/{variable}"


# ----------------------------------------------------------------------------- converting


def options(arch: str, weights: dict[str, np.ndarray] | None = None) -> dict:
    """Model options that Keras's weights for ``arch`` imply (and, given the file's
    ``weights``, the variant their shapes show, such as MobileNet's α)."""
    if weights is None:
        return dict(family_of(arch).OPTIONS.get(arch, {}))
    return _options(arch, _renamed(weights, arch))


def _options(arch: str, renamed: dict[str, np.ndarray]) -> dict:
    family = family_of(arch)
    found = dict(family.OPTIONS.get(arch, {}))
    if hasattr(family, "infer_options"):
        found.update(family.infer_options(arch, renamed))
    return found


def _renamed(weights: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """Keras's keys renamed by the family's rules: ``stage1/block0/bn1/gamma``."""
    rules = family_of(arch).rules(arch)
    return {common.rename(key, rules): value for key, value in weights.items()}


def preprocessing(arch: str, weights: dict[str, np.ndarray] | None = None) -> dict:
    """How the weights expect their input, as Keras's ``preprocess_input`` and the model's own
    rescaling layers prepare it: the whole image resized to the input size, no crop. Given the
    file's ``weights``, normalisation layers stored in it (EfficientNet's) are read."""
    family = family_of(arch)
    size = models.model_info(arch).input_size
    spec = dict(family.PREPROCESSING)
    if weights is not None and hasattr(family, "preprocessing"):
        spec.update(family.preprocessing(weights))
    return dict(input_size=size, resize=size, crop_fraction=1.0, interpolation="bilinear", **spec)


def convert_weights(weights: dict[str, np.ndarray], arch: str, *, num_classes: int = 1000,
                    source: str = "Keras weights") -> tuple[object, dict]:
    """``(model, variables)`` for Keras's ``arch`` with ``weights`` (see ``read``)."""
    renamed = _renamed(weights, arch)
    model = models.create(arch, num_classes=num_classes, **_options(arch, renamed))
    special = getattr(family_of(arch), "special", None)
    converted = {}
    for key, value in _with_unit_scales(renamed).items():
        claimed = special(key, value) if special else None
        converted.update(dict([_flax_layout(key, value)]) if claimed is None else claimed)
    shapes = {p: s.shape for p, s in tree.flatten(models.variable_shapes(
        model, models.model_info(arch).input_size)).items()}
    return model, common.fit_to(shapes, converted, source, f"transferlab's {arch}")


def by_creation_order(paths, module: str):
    """The replacement of a rule matching ``<class>_<k>/`` (the layer number in group 1): the
    k-th auto-named layer of the class is ``paths[k]/<module>``; layers beyond ``paths`` keep
    their names, so that a mismatch report lists them."""
    def replace(match):
        k = int(match[1])
        return f"{paths[k]}/{module}/" if k < len(paths) else match[0]
    return replace


def _with_unit_scales(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A BatchNormalization built with ``scale=False`` has no γ: it is γ = 1."""
    out = dict(weights)
    for key, value in weights.items():
        module_path, _, variable = key.rpartition("/")
        if variable == "moving_mean" and f"{module_path}/gamma" not in weights:
            out[f"{module_path}/gamma"] = np.ones_like(value)
    return out


def _flax_layout(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """``("stage1/block0/conv1/kernel", HWIO)`` → ``("params/stage1/block0/conv1/kernel", HWIO)``:
    Keras's kernels are laid out as Flax's but for depthwise ones. Variables without a rule
    keep their name, so that a mismatch report lists them."""
    module_path, _, variable = key.rpartition("/")
    collection, leaf = _LEAVES.get(variable, ("params", variable))
    if variable == "depthwise_kernel" and value.ndim == 4:
        kh, kw, channels, multiplier = value.shape
        value = value.reshape(kh, kw, 1, channels * multiplier)
    return f"{collection}/{module_path}/{leaf}", value
