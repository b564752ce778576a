"""timm state dicts → transferlab variables.

``arch`` is one of our registry names (``efficientnet_b3``) or one of timm's model names
(``tf_efficientnet_b3``). Where timm has several weight flavours of one architecture, its
model name decides the options (TF's "same" padding, BatchNorm epsilon); our name stands for
timm's flavour of the same name, or its closest (``xception`` → ``legacy_xception``).

Each family module ``research/convert/timm_<family>.py`` defines ``FLAVOURS`` (timm's model
names it converts → ``Flavour``), ``rules(timm_name)`` (ordered regex renames from timm's keys
to our module paths, "." separated) and optionally ``special(renamed_key, value)``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import models
from research import tree
from research.convert import common
from research.convert.torchvision import IMAGENET_MEAN, IMAGENET_STD
from research.errors import CheckpointError

FAMILIES = ("resnet", "vgg", "inception", "xception", "mobilenet", "vit")

INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_*: inputs in [-1, 1]


@dataclasses.dataclass(frozen=True)
class Flavour:
    """One of timm's models as ours: the registry name, the options its weights imply, and its
    default ``pretrained_cfg``'s eval transforms."""

    arch: str
    options: dict = dataclasses.field(default_factory=dict)
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def _flavours() -> dict[str, tuple[object, Flavour]]:
    return {name: (module, flavour) for module in common.family_modules("timm", FAMILIES)
            for name, flavour in module.FLAVOURS.items()}


def timm_name(arch: str) -> str:
    """timm's model name for ``arch``: itself, or the first flavour of our registry name."""
    flavours = _flavours()
    if arch in flavours:
        return arch
    for name, (_, flavour) in flavours.items():
        if flavour.arch == arch:
            return name
    raise CheckpointError(f"no timm converter for {arch!r}; converters exist for "
                          f"{supported()}")


def _resolve(arch: str) -> tuple[str, object, Flavour]:
    name = timm_name(arch)
    return (name, *_flavours()[name])


def registry_name(arch: str) -> str:
    """Our registry name for ``arch`` (ours or timm's)."""
    return _resolve(arch)[2].arch


def supported() -> list[str]:
    flavours = _flavours()
    return sorted({*flavours, *(flavour.arch for _, flavour in flavours.values())})


read = common.read_state_dict


def options(arch: str, weights: dict | None = None) -> dict:
    """Model options that timm's weights for ``arch`` imply (the same for every file)."""
    return dict(_resolve(arch)[2].options)


def convert_weights(state_dict: dict[str, np.ndarray], arch: str, *, num_classes: int = 1000,
                    source: str = "state dict") -> tuple[object, dict]:
    """``(model, variables)`` for timm's ``arch`` with the weights of ``state_dict``."""
    name, family, flavour = _resolve(arch)
    model = models.create(flavour.arch, num_classes=num_classes, **flavour.options)
    converted = common.convert_torch(state_dict, family.rules(name),
                                     getattr(family, "special", None))
    shapes = {p: s.shape for p, s in tree.flatten(models.variable_shapes(
        model, flavour.input_size)).items()}
    return model, common.fit_to(shapes, converted, source, f"transferlab's {flavour.arch}")


def preprocessing(arch: str, weights: dict | None = None) -> dict:
    """How timm's weights for ``arch`` expect their input: its ``pretrained_cfg``'s eval
    transforms (resize the short side to ``input_size / crop_pct``, centre crop)."""
    flavour = _resolve(arch)[2]
    resize = math.floor(flavour.input_size / flavour.crop_pct)
    return dict(input_size=flavour.input_size, resize=resize,
                crop_fraction=flavour.input_size / resize, interpolation=flavour.interpolation,
                mean=[255 * m for m in flavour.mean], std=[255 * s for s in flavour.std],
                channel_order="RGB")


def dense_from_conv(*modules: str):
    """A family's ``special``: the kernels of timm's convolutions that act as our Dense layers
    (a k×k conv on a k×k map, or a 1×1 conv on pooled features), flattened in NHWC order."""
    def special(key: str, value: np.ndarray) -> dict[str, np.ndarray] | None:
        module, _, leaf = key.rpartition(".")
        if module not in modules or leaf != "weight" or value.ndim != 4:
            return None
        return {f"params/{module}/kernel": value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])}
    return special
