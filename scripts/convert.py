"""Convert reference weights into a transferlab checkpoint:

    python -m scripts.convert --source torchvision --arch resnet50 --input resnet50.pth \\
        --output runs/resnet50_tv [--num_classes 1000]
    python -m scripts.convert --source keras --arch mobilenet_v2 --input mobilenet_v2.h5 \\
        --output runs/mnv2_keras

The output directory works as ``init.checkpoint`` and with ``research.pretrained.load``; the
weights' preprocessing (input size, mean, std, resize and crop) is stored in its meta.
"""

import argparse

from research import convert
from scripts import common


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        choices=["torchvision", "timm", "keras", "vit_npz"])
    parser.add_argument("--arch", required=True,
                        help="registry name, e.g. resnet50 (timm: also its model names)")
    parser.add_argument("--input", required=True,
                        help="torchvision/timm: .pth (tensors only) or .safetensors; keras: .h5 "
                             "or .weights.h5; vit_npz: .npz")
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--num_classes", type=int, default=1000)
    args = parser.parse_args()
    _, variables, meta = convert.convert(args.source, args.arch, args.input,
                                         num_classes=args.num_classes)
    convert.write(args.output, variables, meta)
    print(f"wrote {args.output}: {args.arch} from {args.source} ({args.input})")


if __name__ == "__main__":
    common.run_main(main)
