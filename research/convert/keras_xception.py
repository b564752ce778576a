"""Keras's Xception, whose layout the model keeps: ``block2_sepconv1_bn`` →
``block2/sepconv1_bn``, a separable conv's ``depthwise_kernel`` / ``pointwise_kernel`` → its
``depthwise`` / ``pointwise`` convs. Keras leaves the strided 1×1 shortcuts unnamed: the k-th
``conv2d`` and ``batch_normalization`` are the k-th downsampling block's ``residual`` and
``residual_bn``."""

from models import xception
from research.convert.keras import TF, by_creation_order

ARCHS = ("xception",)
OPTIONS = {}
PREPROCESSING = TF

_DOWNSAMPLING = [f"block{index}" for index, (_, downsample)
                 in enumerate(xception.RESIDUAL_BLOCKS, 2) if downsample]

_RULES = (
    (r"^conv2d_(\d+)/", by_creation_order(_DOWNSAMPLING, "residual")),
    (r"^batch_normalization_(\d+)/", by_creation_order(_DOWNSAMPLING, "residual_bn")),
    (r"^block(\d+)_", r"block\1/"),
    (r"/(depthwise|pointwise)_kernel$", r"/\1/\1_kernel"),
    (r"^predictions/", "head/"),
)


def rules(arch: str):
    return _RULES
