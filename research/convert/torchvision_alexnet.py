"""torchvision's AlexNet: ``features.3`` → ``conv2``, ``classifier.4`` → ``fc7``.

torchvision flattens the pooled NCHW features channel-major, we flatten NHWC, so fc6's
input rows are reordered (``nhwc_dense_kernel``, shared with VGG).
"""

from __future__ import annotations

import numpy as np

from models import alexnet

ARCHS = ("alexnet",)

_RULES = (
    (r"^features\.0\.", "conv1."),
    (r"^features\.3\.", "conv2."),
    (r"^features\.6\.", "conv3."),
    (r"^features\.8\.", "conv4."),
    (r"^features\.10\.", "conv5."),
    (r"^classifier\.1\.", "fc6."),
    (r"^classifier\.4\.", "fc7."),
    (r"^classifier\.6\.", "head."),
)


def rules(arch: str):
    return _RULES


def nhwc_dense_kernel(weight: np.ndarray, pool_size: int) -> np.ndarray | None:
    """The Flax kernel of a Linear fed with flattened ``pool_size``² NCHW features, for
    features flattened NHWC; ``None`` (left to the generic rule) if the shape cannot be one."""
    if weight.ndim != 2 or weight.shape[1] % pool_size**2:
        return None
    out_features, in_features = weight.shape
    chw = weight.reshape(out_features, in_features // pool_size**2, pool_size**2)
    return chw.transpose(0, 2, 1).reshape(out_features, in_features).T


def fc6_special(pool_size: int):
    """A converter's ``special``: fc6's weight through ``nhwc_dense_kernel``."""
    def special(key: str, value: np.ndarray) -> dict[str, np.ndarray] | None:
        kernel = nhwc_dense_kernel(value, pool_size) if key == "fc6.weight" else None
        return None if kernel is None else {"params/fc6/kernel": kernel}
    return special


special = fc6_special(alexnet.POOL_SIZE)
