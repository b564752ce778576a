"""timm's VGGs: torchvision's ``features``; the classifier is a ``ConvMlp`` whose 7×7
``pre_logits.fc1`` and 1×1 ``pre_logits.fc2`` convolutions are our ``fc6`` and ``fc7`` Dense
layers, then ``head.fc``.

The two agree for feature maps up to 7×7 (inputs below 256 px). On larger maps timm slides
``fc1`` over the map and averages ``fc2``'s outputs, where we (as torchvision) first pool the map
to 7×7.
"""

from research.convert import torchvision_vgg
from research.convert.timm import Flavour, dense_from_conv

FLAVOURS = {arch: Flavour(arch, interpolation="bilinear") for arch in torchvision_vgg.ARCHS}

_CLASSIFIER_RULES = (
    (r"^pre_logits\.fc1\.", "fc6."),
    (r"^pre_logits\.fc2\.", "fc7."),
    (r"^head\.fc\.", "head."),
)


def rules(name: str):
    return (*torchvision_vgg.rules(name), *_CLASSIFIER_RULES)


special = dense_from_conv("fc6", "fc7")
