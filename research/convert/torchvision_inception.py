"""torchvision's GoogLeNet and Inception v3: ``conv1`` → ``stem/conv1``,
``inception3a.branch2.1`` → ``inception3a/branch2_1``, ``fc`` → ``head``.

torchvision builds both with ``transform_input=True`` whenever it loads its ImageNet weights (they
were ported from networks trained on [-1, 1] inputs), so converted models do too; clone them with
``transform_input=False`` for weights trained on ImageNet-normalised inputs.
"""

ARCHS = ("googlenet", "inception_v3")

OPTIONS = {arch: {"transform_input": True} for arch in ARCHS}


def options_of(arch: str, weights: dict) -> dict:
    """An Inception v3 state dict saved with ``aux_logits=False`` (no ``AuxLogits.*``) converts
    to a model without the auxiliary head (``aux_logits=False`` in the checkpoint's options)."""
    if arch == "inception_v3" and not any(k.startswith("AuxLogits.") for k in weights):
        return {"aux_logits": False}
    return {}

_STEM_CONVS = {
    "googlenet": ("conv1", "conv2", "conv3"),
    "inception_v3": ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3"),
}


def rules(arch: str):
    return (
        (rf"^({'|'.join(_STEM_CONVS[arch])})\.", r"stem.\1."),
        (r"\.branch(\d)\.(\d)\.", r".branch\1_\2."),
        (r"^fc\.", "head."),
    )


def special(key: str, value):
    """Drops GoogLeNet's auxiliary heads: torchvision's checkpoint carries them untrained and its
    own builder discards them, as the registry's ``googlenet`` (``aux_logits=False``) has none."""
    return {} if key.startswith(("aux1.", "aux2.")) else None
