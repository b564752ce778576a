"""timm's ``legacy_xception`` (a port of Keras's Xception) → our Keras-layout Xception.

timm numbers the residual blocks from 1 where Keras's entry convs are ``block1``:
``conv1`` / ``bn1`` → ``block1/conv1`` / ``conv1_bn``, ``block<k>`` → ``block<k+1>``, whose
separable convs ``rep.<i>`` (``conv1`` depthwise, ``pointwise``) and the BatchNorms after them
→ ``sepconv<n>`` / ``sepconv<n>_bn``, ``skip`` / ``skipbn`` → ``residual`` / ``residual_bn``;
the exit convs ``conv3`` / ``conv4`` → ``block14/sepconv1`` / ``sepconv2``, ``fc`` → ``head``.

The port pads its strided max-pools symmetrically (PyTorch's ``MaxPool2d(3, 2, 1)``) where
Keras pads "same", and its BatchNorms use PyTorch's epsilon: the ``padding="torch"`` variant.
"""

from models import layers, xception
from research.convert.timm import INCEPTION_MEAN, INCEPTION_STD, Flavour

FLAVOURS = {"legacy_xception": Flavour(
    "xception", dict(padding="torch", bn_eps=layers.TORCH_BN_EPS,
                     bn_momentum=layers.TORCH_BN_MOMENTUM),
    input_size=299, crop_pct=0.8975, mean=INCEPTION_MEAN, std=INCEPTION_STD)}

_EXIT_BLOCK = f"block{len(xception.RESIDUAL_BLOCKS) + 2}"


def rules(name: str):
    out = [(r"^conv([12])\.", r"block1.conv\1."), (r"^bn([12])\.", r"block1.conv\1_bn.")]
    for k, (widths, _) in enumerate(xception.RESIDUAL_BLOCKS, start=1):
        out += _block_rules(f"block{k}", f"block{k + 1}", len(widths), relu_first=k > 1)
    for n, (conv, bn) in enumerate((("conv3", "bn3"), ("conv4", "bn4")), start=1):
        out += _separable_rules(conv, f"{_EXIT_BLOCK}.sepconv{n}")
        out.append((rf"^{bn}\.", f"{_EXIT_BLOCK}.sepconv{n}_bn."))
    return (*out, (r"^fc\.", "head."))


def _block_rules(key: str, target: str, depth: int, relu_first: bool):
    """``rep`` is [ReLU,] SeparableConv2d, BatchNorm, (ReLU, SeparableConv2d, BatchNorm)…"""
    out = [(rf"^{key}\.skip\.", f"{target}.residual."),
           (rf"^{key}\.skipbn\.", f"{target}.residual_bn.")]
    for n in range(1, depth + 1):
        index = 3 * (n - 1) + relu_first
        out += _separable_rules(rf"{key}\.rep\.{index}", f"{target}.sepconv{n}")
        out.append((rf"^{key}\.rep\.{index + 1}\.", f"{target}.sepconv{n}_bn."))
    return out


def _separable_rules(key: str, target: str):
    return [(rf"^{key}\.conv1\.", f"{target}.depthwise."),
            (rf"^{key}\.pointwise\.", f"{target}.pointwise.")]
