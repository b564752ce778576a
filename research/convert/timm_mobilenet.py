"""timm's MobileNet V2 / V3 and EfficientNets (its ``EfficientNetBuilder`` models).

``conv_stem`` / ``bn1`` → ``stem``, ``blocks.<i>.<j>`` → ``block<k>`` (MobileNets, numbered
through the stages) or ``stage<i+1>/block<j>`` (EfficientNets), ``conv_head`` / ``bn2`` →
``features_last``, ``classifier`` → ``head``. Inside a block, an ``InvertedResidual``'s
``conv_pw`` / ``conv_dw`` / ``conv_pwl`` (with ``bn1`` / ``bn2`` / ``bn3``) → ``expand`` /
``depthwise`` / ``project``; a ``DepthwiseSeparableConv`` (our blocks without expansion) has only
``conv_dw`` / ``bn1`` → ``depthwise`` and ``conv_pw`` / ``bn2`` → ``project``;
``se.conv_reduce`` / ``se.conv_expand`` → ``se/reduce`` / ``se/expand``. MobileNetV3's last stage
(a 1×1 ``ConvBnAct``) → ``features_last`` and its ``conv_head``, a 1×1 conv with bias on the
pooled features, → the ``pre_head`` Dense.

timm's own weights need PyTorch's BatchNorm epsilon and symmetric padding; its ``tf_`` ports of
Google's EfficientNets need TensorFlow's "same" padding and epsilon 1e-3.
"""

from __future__ import annotations

import itertools

import models
from models import layers
from models.mobilenet import TF_BN_EPS, TF_BN_MOMENTUM, BlockSpec
from research.convert.timm import INCEPTION_MEAN, INCEPTION_STD, Flavour, dense_from_conv

TORCH_BN = dict(padding="torch", bn_eps=layers.TORCH_BN_EPS, bn_momentum=layers.TORCH_BN_MOMENTUM)
TF_SAME = dict(padding="same", bn_eps=TF_BN_EPS, bn_momentum=TF_BN_MOMENTUM)

# timm's default pretrained_cfg of each EfficientNet: input size, crop_pct (and mean/std where
# they are not ImageNet's).
_EFFICIENTNET_CFG = {
    "efficientnet_b0": (224, 0.875),
    "efficientnet_b1": (240, 0.9, dict(mean=INCEPTION_MEAN, std=INCEPTION_STD)),
    "efficientnet_b2": (256, 0.875), "efficientnet_b3": (288, 0.875), "efficientnet_b4": (320, 0.875),
    "efficientnet_b5": (448, 1.0), "efficientnet_b6": (528, 0.942),
    "efficientnet_b7": (600, 0.949),
    "tf_efficientnet_b0": (224, 0.875), "tf_efficientnet_b1": (240, 0.882),
    "tf_efficientnet_b2": (260, 0.89), "tf_efficientnet_b3": (300, 0.904),
    "tf_efficientnet_b4": (380, 0.922), "tf_efficientnet_b5": (456, 0.934),
    "tf_efficientnet_b6": (528, 0.942), "tf_efficientnet_b7": (600, 0.949),
}


def _efficientnet(name: str, input_size: int, crop_pct: float, cfg: dict | None = None
                  ) -> Flavour:
    tf_port = name.startswith("tf_")
    return Flavour(name.removeprefix("tf_"), TF_SAME if tf_port else TORCH_BN,
                   input_size=input_size, crop_pct=crop_pct, **(cfg or {}))


FLAVOURS = {
    "mobilenetv2_100": Flavour("mobilenet_v2", TORCH_BN),
    "mobilenetv3_large_100": Flavour("mobilenet_v3_large", TORCH_BN),
    "mobilenetv3_small_100": Flavour("mobilenet_v3_small", TORCH_BN),
    **{name: _efficientnet(name, *cfg) for name, cfg in _EFFICIENTNET_CFG.items()},
}

_INVERTED_RESIDUAL = {"conv_pw": "expand.conv", "bn1": "expand.bn", "conv_dw": "depthwise.conv",
                      "bn2": "depthwise.bn", "se": "se", "conv_pwl": "project.conv",
                      "bn3": "project.bn"}
_DEPTHWISE_SEPARABLE = {"conv_dw": "depthwise.conv", "bn1": "depthwise.bn", "se": "se",
                        "conv_pw": "project.conv", "bn2": "project.bn"}
_COMMON_RULES = (
    (r"^conv_stem\.", "stem.conv."),
    (r"^bn1\.", "stem.bn."),
    (r"\.se\.conv_reduce\.", ".se.reduce."),
    (r"\.se\.conv_expand\.", ".se.expand."),
    (r"^classifier\.", "head."),
)


def rules(name: str):
    arch = FLAVOURS[name].arch
    stages, out = _stages(arch), []
    for i, blocks in enumerate(stages):
        for j, (target, spec) in enumerate(blocks):
            names = _INVERTED_RESIDUAL if spec.has_expand else _DEPTHWISE_SEPARABLE
            out += [(rf"^blocks\.{i}\.{j}\.{theirs}\.", f"{target}.{ours}.")
                    for theirs, ours in names.items()]
    if arch.startswith("mobilenet_v3"):
        out += [(rf"^blocks\.{len(stages)}\.0\.conv\.", "features_last.conv."),
                (rf"^blocks\.{len(stages)}\.0\.bn1\.", "features_last.bn."),
                (r"^conv_head\.", "pre_head.")]
    else:
        out += [(r"^conv_head\.", "features_last.conv."), (r"^bn2\.", "features_last.bn.")]
    return (*out, *_COMMON_RULES)


def _stages(arch: str) -> list[list[tuple[str, BlockSpec]]]:
    """Our blocks (path and spec) grouped as timm's stages ``blocks.<i>``: EfficientNet's
    stages, or the MobileNets' runs of blocks of one width."""
    model = models.create(arch, num_classes=1000)
    if arch.startswith("efficientnet"):
        return [[(f"stage{i}.block{j}", spec) for j, spec in enumerate(specs)]
                for i, specs in enumerate(model.stage_specs(), start=1)]
    numbered = enumerate(model.block_specs(), start=1)
    return [[(f"block{k}", spec) for k, spec in group]
            for _, group in itertools.groupby(numbered, key=lambda item: item[1].features)]


special = dense_from_conv("pre_head")
