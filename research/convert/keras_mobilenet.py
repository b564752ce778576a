"""Keras's MobileNet (V1), MobileNetV2 and MobileNetV3Small/Large, α and ``minimalistic`` read
off the shapes.

- V1: ``conv1`` → ``stem/conv``, ``conv_dw_3`` / ``conv_pw_3`` (+ ``_bn``) →
  ``block3/depthwise`` / ``block3/pointwise``, the 1×1 conv ``conv_preds`` → ``head``.
- V2: ``Conv1`` / ``bn_Conv1`` → ``stem``, ``expanded_conv_depthwise`` (block 0) and
  ``block_3_expand_BN`` → ``block1/depthwise/conv``, ``block4/expand/bn``, ``Conv_1`` →
  ``features_last``, ``predictions`` → ``head``.
- V3 (Keras 3's names, and the published files' Keras 2 names such as
  ``expanded_conv_1/expand/BatchNorm``): ``conv`` → ``stem``,
  ``expanded_conv_3_squeeze_excite_conv`` / ``_conv_1`` → ``block4/se/reduce`` / ``expand``,
  ``conv_1`` → ``features_last``, the 1×1 convs ``conv_2`` / ``logits`` → ``pre_head`` /
  ``head``.
"""

from models.mobilenet import V1_SETTING, V3_LARGE, V3_SMALL
from research.convert.keras import TF

ARCHS = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
_KERAS_BN = dict(padding="same", bn_eps=1e-3, bn_momentum=0.999)
OPTIONS = {  # V1 is Keras's layout already
    "mobilenet_v2": _KERAS_BN,
    "mobilenet_v3_small": dict(_KERAS_BN, keras_widths=True),
    "mobilenet_v3_large": dict(_KERAS_BN, keras_widths=True),
}
PREPROCESSING = TF  # V3's own Rescaling layer maps [0, 255] to [-1, 1] as V1/V2's preprocess_input

# Keras 2 and 3 name a depthwise kernel ``depthwise_kernel`` and ``kernel``.
_DEPTHWISE = ((r"/depthwise/conv/(?:depthwise_)?kernel$", "/depthwise/conv/depthwise_kernel"),)

_V1_KINDS = {"dw": "depthwise", "pw": "pointwise"}
_V1_RULES = (
    (r"^conv1/", "stem/conv/"),
    (r"^conv1_bn/", "stem/bn/"),
    (r"^conv_(dw|pw)_(\d+)/", lambda m: f"block{m[2]}/{_V1_KINDS[m[1]]}/conv/"),
    (r"^conv_(dw|pw)_(\d+)_bn/", lambda m: f"block{m[2]}/{_V1_KINDS[m[1]]}/bn/"),
    (r"^conv_preds/", "head/"),
)

_V2_RULES = (
    (r"^Conv1/", "stem/conv/"),
    (r"^bn_Conv1/", "stem/bn/"),
    (r"^expanded_conv_", "block_0_"),
    (r"^block_(\d+)_(expand|depthwise|project)_BN/", lambda m: f"block{int(m[1]) + 1}/{m[2]}/bn/"),
    (r"^block_(\d+)_(expand|depthwise|project)/", lambda m: f"block{int(m[1]) + 1}/{m[2]}/conv/"),
    (r"^Conv_1/", "features_last/conv/"),
    (r"^Conv_1_bn/", "features_last/bn/"),
    (r"^predictions/", "head/"),
)

# Keras 2's names → Keras 3's: Conv/BatchNorm → conv_bn, expanded_conv_1/expand → …_1_expand.
_V3_KERAS2_NAMES = (
    (r"/BatchNorm/", "_bn/"),
    (r"^Conv", "conv"),
    (r"^Logits/", "logits/"),
    (r"^expanded_conv(_\d+)?/", r"expanded_conv\1_"),
    (r"squeeze_excite/Conv", "squeeze_excite_conv"),
)
_V3_BLOCK = r"^expanded_conv_(?:(\d+)_)?"
_V3_RULES = (
    *_V3_KERAS2_NAMES,
    (r"^conv/", "stem/conv/"),
    (r"^conv_bn/", "stem/bn/"),
    (r"^conv_1/", "features_last/conv/"),
    (r"^conv_1_bn/", "features_last/bn/"),
    (r"^conv_2/", "pre_head/"),
    (r"^logits/", "head/"),
    (_V3_BLOCK + r"squeeze_excite_conv/", lambda m: f"{_v3_block(m)}/se/reduce/"),
    (_V3_BLOCK + r"squeeze_excite_conv_1/", lambda m: f"{_v3_block(m)}/se/expand/"),
    (_V3_BLOCK + r"(expand|depthwise|project)/", lambda m: f"{_v3_block(m)}/{m[2]}/conv/"),
    (_V3_BLOCK + r"(expand|depthwise|project)_bn/", lambda m: f"{_v3_block(m)}/{m[2]}/bn/"),
)


def _v3_block(match) -> str:
    return f"block{int(match[1] or 0) + 1}"


def rules(arch: str):
    version = {"mobilenet_v1": _V1_RULES, "mobilenet_v2": _V2_RULES}.get(arch, _V3_RULES)
    return (*version, *_DEPTHWISE)


def special(key: str, value):
    """Keras's classifiers after global pooling are 1×1 convs (V1's ``conv_preds``, V3's
    ``conv_2`` and ``logits``): Dense kernels here."""
    if key in ("head/kernel", "pre_head/kernel") and value.ndim == 4:
        return {f"params/{key}": value.reshape(value.shape[-2:])}
    return None


# The last block's projection, and its width at α = 1.
_LAST_PROJECTION = {
    "mobilenet_v1": (f"block{len(V1_SETTING)}/pointwise/conv/kernel", V1_SETTING[-1][0]),
    "mobilenet_v2": ("block17/project/conv/kernel", 320),
    "mobilenet_v3_small": (f"block{len(V3_SMALL)}/project/conv/kernel", V3_SMALL[-1][2]),
    "mobilenet_v3_large": (f"block{len(V3_LARGE)}/project/conv/kernel", V3_LARGE[-1][2]),
}


def infer_options(arch: str, renamed: dict) -> dict:
    """α from the last block's width, and V3's ``minimalistic`` from its lack of
    squeeze-excite."""
    key, width = _LAST_PROJECTION[arch]
    if key not in renamed:
        return {}  # another architecture: the mismatch report tells
    found = {"alpha" if arch == "mobilenet_v1" else "width_mult": renamed[key].shape[-1] / width}
    if arch.startswith("mobilenet_v3"):
        found["minimalistic"] = not any("/se/" in k for k in renamed)
    return found
