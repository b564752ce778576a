"""torchvision's MobileNet V2 and V3: ``features.<i>`` → ``stem`` / ``block<i>`` /
``features_last``, a block's numbered sublayers → ``expand`` / ``depthwise`` / ``se`` /
``project`` (V2's flat ``conv.2`` / ``conv.3`` → ``project/conv`` / ``project/bn``), V3's
``classifier.0`` → ``pre_head``, the last Linear → ``head``."""

from __future__ import annotations

import models
from models.mobilenet import BlockSpec

ARCHS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")

# Inside Conv2dNormActivation and SqueezeExcitation; the sublayer rules have run before these.
COMMON_RULES = (
    (r"\.0\.(\w+)$", r".conv.\1"),
    (r"\.1\.(\w+)$", r".bn.\1"),
    (r"\.fc1\.", ".reduce."),
    (r"\.fc2\.", ".expand."),
)


def sublayer_names(spec: BlockSpec) -> list[str]:
    """Our names for the sublayers torchvision's V3 InvertedResidual and MBConv number."""
    return [*(["expand"] if spec.has_expand else []), "depthwise",
            *(["se"] if spec.se_channels else []), "project"]


def sublayer_rules(key: str, target: str, names) -> list[tuple[str, str]]:
    """``<key>.<k>.`` → ``<target>.<names[k]>.``."""
    return [(rf"^{key}\.{k}\.", f"{target}.{name}.") for k, name in enumerate(names)]


def rules(arch: str):
    model = models.create(arch, num_classes=1000)
    specs = model.block_specs()
    out = [(r"^features\.0\.", "stem."), (rf"^features\.{len(specs) + 1}\.", "features_last.")]
    for i, spec in enumerate(specs, start=1):
        if arch == "mobilenet_v2":
            names = [*sublayer_names(spec)[:-1], "project.conv", "project.bn"]
            out += sublayer_rules(rf"features\.{i}\.conv", f"block{i}", names)
        else:
            out += sublayer_rules(rf"features\.{i}\.block", f"block{i}", sublayer_names(spec))
    if arch == "mobilenet_v2":
        out.append((r"^classifier\.1\.", "head."))
    else:
        out += [(r"^classifier\.0\.", "pre_head."), (r"^classifier\.3\.", "head.")]
    return (*out, *COMMON_RULES)
