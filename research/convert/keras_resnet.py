"""Keras's ResNet50/101/152 (v1): ``conv3_block2_1_conv`` → ``stage2/block1/conv1``, the
shortcut ``conv3_block1_0_conv`` / ``_0_bn`` → ``stage2/block0/downsample/conv`` / ``bn``,
``conv1_conv`` / ``conv1_bn`` → ``stem/conv1`` / ``stem/bn1``, ``predictions`` → ``head``."""

from research.convert.keras import CAFFE

ARCHS = ("resnet50", "resnet101", "resnet152")
# Keras's v1: the stride in the bottleneck's first 1×1 conv, biases on every conv.
OPTIONS = {arch: dict(stride_in_1x1=True, conv_bias=True, bn_eps=1.001e-5) for arch in ARCHS}
PREPROCESSING = CAFFE


def _block(match) -> str:
    stage, block, index, kind = match[1], match[2], match[3], match[4]
    path = f"stage{int(stage) - 1}/block{int(block) - 1}"
    return f"{path}/downsample/{kind}/" if index == "0" else f"{path}/{kind}{index}/"


_RULES = (
    (r"^conv1_(conv|bn)/", lambda m: f"stem/{m[1]}1/"),
    (r"^conv(\d)_block(\d+)_(\d)_(conv|bn)/", _block),
    (r"^predictions/", "head/"),
)


def rules(arch: str):
    return _RULES
