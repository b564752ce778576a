"""timm's ResNets keep torchvision's keys (``layer2.0.downsample.0`` → ``stage2/block0/…``)."""

from research.convert import torchvision_resnet
from research.convert.timm import Flavour

FLAVOURS = {arch: Flavour(arch, crop_pct=0.95) for arch in torchvision_resnet.ARCHS}


def rules(name: str):
    return torchvision_resnet.rules(name)
