"""torchvision's EfficientNet B0–B7: ``features.<i>.<j>.block.<k>`` → ``stage<i>/block<j>/…``
(sublayers named as MobileNetV3's), ``features.8`` → ``features_last``, ``classifier.1`` →
``head``."""

from __future__ import annotations

import models
from research.convert.torchvision_mobilenet import COMMON_RULES, sublayer_names, sublayer_rules

ARCHS = tuple(f"efficientnet_b{i}" for i in range(8))


def rules(arch: str):
    stages = models.create(arch, num_classes=1000).stage_specs()
    out = [(r"^features\.0\.", "stem."), (rf"^features\.{len(stages) + 1}\.", "features_last.")]
    for i, specs in enumerate(stages, start=1):
        for j, spec in enumerate(specs):
            out += sublayer_rules(rf"features\.{i}\.{j}\.block", f"stage{i}.block{j}",
                                  sublayer_names(spec))
    return (*out, (r"^classifier\.1\.", "head."), *COMMON_RULES)
