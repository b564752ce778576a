"""torchvision state dicts → transferlab variables.

Each family module ``research/convert/torchvision_<family>.py`` defines
``ARCHS`` (our registry names it converts), ``rules(arch)`` (ordered regex renames from
torchvision's keys to our module paths, "." separated) and optionally
``special(renamed_key, value)`` for tensors with no generic rule.
"""

from __future__ import annotations

import numpy as np

import models
from research import tree
from research.convert import common

FAMILIES = ("resnet", "alexnet", "vgg", "inception", "mobilenet", "efficientnet", "vit")

# torchvision's eval transforms: resize the short side, centre crop, ImageNet mean/std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def family_of(arch: str):
    return common.family_of("torchvision", FAMILIES, arch)


def supported() -> list[str]:
    modules = common.family_modules("torchvision", FAMILIES)
    return [arch for module in modules for arch in module.ARCHS]


read = common.read_state_dict


def options(arch: str, weights: dict | None = None) -> dict:
    """Model options that torchvision's weights for ``arch`` imply: the family's, and what a
    family's ``options_of(arch, weights)`` reads off the file (an Inception v3 saved without
    its auxiliary head)."""
    family = family_of(arch)
    implied = family.options_of(arch, weights) if weights and hasattr(family, "options_of") else {}
    return {**getattr(family, "OPTIONS", {}).get(arch, {}), **implied}


def input_size(arch: str, weights: dict | None = None) -> int:
    """The image size the weights were trained at: what a family's ``input_size_of(arch,
    weights)`` reads off the file (a ViT's position embedding), else the registry's."""
    family = family_of(arch)
    if weights and hasattr(family, "input_size_of"):
        return family.input_size_of(arch, weights)
    return models.model_info(arch).input_size


def convert_weights(state_dict: dict[str, np.ndarray], arch: str, *, num_classes: int = 1000,
                    source: str = "state dict") -> tuple[object, dict]:
    """``(model, variables)`` for torchvision's ``arch`` with the weights of ``state_dict``."""
    model = models.create(arch, num_classes=num_classes, **options(arch, state_dict))
    family = family_of(arch)
    converted = common.convert_torch(state_dict, family.rules(arch), getattr(family, "special", None))
    shapes = {p: s.shape for p, s in tree.flatten(models.variable_shapes(
        model, input_size(arch, state_dict))).items()}
    return model, common.fit_to(shapes, converted, source, f"transferlab's {arch}")


# torchvision's IMAGENET1K_V1 eval transforms where they differ from resize 256 → crop 224,
# bilinear: (crop, resize, interpolation).
_EVAL_TRANSFORMS = {
    "inception_v3": (299, 342, "bilinear"), "vit_l16": (224, 242, "bilinear"),
    "efficientnet_b0": (224, 256, "bicubic"), "efficientnet_b1": (240, 256, "bicubic"),
    "efficientnet_b2": (288, 288, "bicubic"), "efficientnet_b3": (300, 320, "bicubic"),
    "efficientnet_b4": (380, 384, "bicubic"), "efficientnet_b5": (456, 456, "bicubic"),
    "efficientnet_b6": (528, 528, "bicubic"), "efficientnet_b7": (600, 600, "bicubic"),
}


# torchvision's eval transforms of weights trained at another size than the registry's (its
# ViT SWAG weights at 384 and 512): resize to the size, no crop, bicubic.
def _swag_transform(size: int) -> tuple[int, int, str]:
    return size, size, "bicubic"


def preprocessing(arch: str, weights: dict | None = None) -> dict:
    """How torchvision's weights expect their input: its ``IMAGENET1K_V1`` eval transforms, or
    SWAG's for weights trained at another size (read off the file, ``input_size``)."""
    size = input_size(arch, weights)
    crop, resize, interpolation = (_EVAL_TRANSFORMS.get(arch, (224, 256, "bilinear"))
                                   if size == models.model_info(arch).input_size
                                   else _swag_transform(size))
    return dict(input_size=crop, resize=resize, crop_fraction=crop / resize,
                interpolation=interpolation, mean=[255 * m for m in IMAGENET_MEAN],
                std=[255 * s for s in IMAGENET_STD], channel_order="RGB")
