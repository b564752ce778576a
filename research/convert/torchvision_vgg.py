"""torchvision's VGGs: the flat ``features.<i>`` → ``block<stage>.conv<j>`` / ``bn<j>``,
``classifier.0/3/6`` → ``fc6`` / ``fc7`` / ``head``; fc6's inputs reordered as AlexNet's."""

from __future__ import annotations

import models
from models import vgg
from research.convert.torchvision_alexnet import fc6_special

ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")

_CLASSIFIER_RULES = (
    (r"^classifier\.0\.", "fc6."),
    (r"^classifier\.3\.", "fc7."),
    (r"^classifier\.6\.", "head."),
)


def rules(arch: str):
    model = models.create(arch, num_classes=1000)
    return (*_feature_rules(model.depths, model.batch_norm), *_CLASSIFIER_RULES)


def _feature_rules(depths, batch_norm: bool):
    """torchvision's ``features`` is conv[, bn], relu per conv and a max-pool per stage."""
    rules, index = [], 0
    for stage, depth in enumerate(depths, start=1):
        for j in range(1, depth + 1):
            rules.append((rf"^features\.{index}\.", f"block{stage}.conv{j}."))
            if batch_norm:
                rules.append((rf"^features\.{index + 1}\.", f"block{stage}.bn{j}."))
            index += 3 if batch_norm else 2
        index += 1
    return rules


special = fc6_special(vgg.POOL_SIZE)
