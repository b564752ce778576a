"""Keras's InceptionV3. Keras names its 94 conv–BatchNorm pairs automatically (``conv2d_k``,
``batch_normalization_k``), so they map by creation order: the k-th pair is the k-th entry of
``CONVS``, in the order Keras's ``inception_v3`` builds them (the ``branch…`` modules below in
the order of their definitions). ``predictions`` → ``head``."""

from research.convert.keras import TF, by_creation_order

ARCHS = ("inception_v3",)
# No auxiliary head; the 3×3 average pools ("same" padding) do not count the padding.
OPTIONS = {"inception_v3": dict(aux_logits=False, count_include_pad=False)}
PREPROCESSING = TF

_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
_MODULE_CONVS = {  # models.inception's modules A–E
    "A": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "D": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"),
    "E": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
}
_MIXED = (("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
          ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
          ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E"))
CONVS = (*(f"stem/{name}" for name in _STEM),
         *(f"{mixed}/{name}" for mixed, kind in _MIXED for name in _MODULE_CONVS[kind]))

_RULES = (
    (r"^conv2d_(\d+)/", by_creation_order(CONVS, "conv")),
    (r"^batch_normalization_(\d+)/", by_creation_order(CONVS, "bn")),
    (r"^predictions/", "head/"),
)


def rules(arch: str):
    return _RULES
