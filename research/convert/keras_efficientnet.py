"""Keras's EfficientNetB0–B7: ``block2a_expand_conv`` → ``stage2/block0/expand/conv``,
``block2b_dwconv`` / ``_bn`` → ``stage2/block1/depthwise/conv`` / ``bn``, ``_se_reduce`` /
``_se_expand`` → ``se/reduce`` / ``expand``, ``_project_conv`` / ``_project_bn`` → ``project``,
``stem_conv`` / ``top_conv`` → ``stem`` / ``features_last``, ``predictions`` → ``head``.

The model's own ``Rescaling(1/255)`` and ``Normalization`` layers become the preprocessing.
"""

import re

import numpy as np

ARCHS = tuple(f"efficientnet_b{i}" for i in range(8))
OPTIONS = {arch: dict(padding="same", bn_eps=1e-3, bn_momentum=0.99) for arch in ARCHS}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What Keras's ImageNet weights expect: their Normalization layer holds the standard deviations
# as variances, which Keras corrects with a further Rescaling(1/sqrt(std)) (tensorflow#49930).
PREPROCESSING = dict(mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
                     channel_order="RGB")

_KINDS = {"expand_conv": "expand/conv", "expand_bn": "expand/bn", "dwconv": "depthwise/conv",
          "bn": "depthwise/bn", "se_reduce": "se/reduce", "se_expand": "se/expand",
          "project_conv": "project/conv", "project_bn": "project/bn"}

_RULES = (
    (r"^block(\d)([a-z])_([a-z_]+)/",
     lambda m: f"stage{m[1]}/block{ord(m[2]) - ord('a')}/{_KINDS.get(m[3], m[3])}/"),
    (r"/depthwise/conv/(?:depthwise_)?kernel$", "/depthwise/conv/depthwise_kernel"),
    (r"^stem_(conv|bn)/", r"stem/\1/"),
    (r"^top_(conv|bn)/", r"features_last/\1/"),
    (r"^predictions/", "head/"),
    (r"^normalization(_\d+)?/", "normalization/"),
)


def rules(arch: str):
    return _RULES


def special(key: str, value):
    """The Normalization layer's statistics are the preprocessing, not parameters."""
    return {} if key.startswith("normalization/") else None


def preprocessing(weights: dict) -> dict:
    """The file's Normalization layer: ``(x/255 - mean) / sqrt(variance)``, or Keras's ImageNet
    convention when it holds the ImageNet weights' standard deviations as variances."""
    stats = {m[1]: value for key, value in weights.items()
             if (m := re.match(r"^normalization(?:_\d+)?/(mean|variance)$", key))}
    if len(stats) < 2 or np.allclose(stats["variance"], IMAGENET_STD, atol=1e-6):
        return {}
    return dict(mean=[255 * m for m in stats["mean"]],
                std=[255 * float(np.sqrt(v)) for v in stats["variance"]])
