"""timm's Vision Transformers (``vit_base_patch16_224`` …): ``blocks.3`` → ``block03``,
``norm1`` / ``norm2`` → ``ln1`` / ``ln2``, the fused ``attn.qkv`` split into ``query``, ``key``
and ``value`` and ``attn.proj`` → ``attn/out`` in Flax's per-head layout (as torchvision's)."""

from research.convert import torchvision_vit
from research.convert.timm import INCEPTION_MEAN, INCEPTION_STD, Flavour

_SIZES = {"tiny": "ti", "small": "s", "base": "b", "large": "l"}

# timm has no ViT-Ti/32.
FLAVOURS = {
    f"vit_{size}_patch{patch}_{image}": Flavour(
        f"vit_{short}{patch}", input_size=image, crop_pct=0.9 if image == 224 else 1.0,
        mean=INCEPTION_MEAN, std=INCEPTION_STD)
    for image in (224, 384) for size, short in _SIZES.items() for patch in (16, 32)
    if f"vit_{short}{patch}" != "vit_ti32"
}

_RULES = (
    (r"^cls_token$", "embed.cls_token"),
    (r"^pos_embed$", "embed.pos_embedding"),
    (r"^patch_embed\.proj\.", "embed.patch."),
    (r"^blocks\.(\d)\.", r"block0\1."),
    (r"^blocks\.(\d\d)\.", r"block\1."),
    (r"\.norm(\d)\.", r".ln\1."),
    (r"\.attn\.qkv\.(weight|bias)$", r".attn.in_proj_\1"),
    (r"\.attn\.proj\.", ".attn.out."),
)


def rules(name: str):
    return _RULES


special = torchvision_vit.special
