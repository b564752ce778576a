"""timm's Inception v3 keeps torchvision's keys, but without the auxiliary head and without
``transform_input``: its weights expect inputs in [-1, 1]."""

from research.convert import torchvision_inception
from research.convert.timm import INCEPTION_MEAN, INCEPTION_STD, Flavour

FLAVOURS = {"inception_v3": Flavour("inception_v3", dict(aux_logits=False, transform_input=False),
                                    input_size=299, mean=INCEPTION_MEAN, std=INCEPTION_STD)}


def rules(name: str):
    return torchvision_inception.rules(name)
