"""Keras's VGG16 and VGG19: ``block3_conv2`` → ``block3/conv2``, ``fc1`` / ``fc2`` /
``predictions`` → ``fc6`` / ``fc7`` / ``head``. Keras flattens the 7×7 map in NHWC order, as
the model does, so fc1 needs no reordering."""

from research.convert.keras import CAFFE

ARCHS = ("vgg16", "vgg19")
OPTIONS = {}
PREPROCESSING = CAFFE

_RULES = (
    (r"^block(\d)_conv(\d)/", r"block\1/conv\2/"),
    (r"^fc1/", "fc6/"),
    (r"^fc2/", "fc7/"),
    (r"^predictions/", "head/"),
)


def rules(arch: str):
    return _RULES
