"""torchvision's ResNets: ``layer2.0.downsample.0`` → ``stage2/block0/downsample/conv``."""

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

_RULES = (
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.bn1."),
    (r"^layer(\d)\.(\d+)\.", r"stage\1.block\2."),
    (r"\.downsample\.0\.", ".downsample.conv."),
    (r"\.downsample\.1\.", ".downsample.bn."),
    (r"^fc\.", "head."),
)


def rules(arch: str):
    return _RULES
