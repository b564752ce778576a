"""Fine-tune a converted checkpoint on your own image folder.

The folder has one subfolder of JPEG or PNG images (any size) per class, under ``train/`` and
``test/``, or directly in it (then 20% of each class, chosen with seed 0, is held out for
testing; ``data.test_fraction``). From a torchvision state dict to a result:

    python -m scripts.convert --source torchvision --arch resnet18 --input resnet18.pth \\
        --output runs/r18
    python -m scripts.train --workdir runs/r18_photos \\
        --config configs/finetune.py:checkpoint=runs/r18,folder=~/photos

Training crops a random 25–100% of each image's area (inception crop, ``data.crop_scale``,
``data.crop_ratio``) resized to the checkpoint's input size and flips half of them
(``data.flip``); evaluation uses the weights' own resize and centre crop. The checkpoints in
``runs/r18_photos/checkpoints`` record the class names (``meta["class_names"]``). Decoding
and augmentation run in ``data.workers`` processes: give it the host's spare cores.

Measured on 2026-12-07 (2 cores of an AMD EPYC): a torchvision ResNet-18 with random weights
converted as above, fine-tuned on a folder of 10 Fashion-MNIST classes (100 training and 100
test images each, PNGs of 28–64 px, written by ``tests.research.test_pipeline``'s
``write_fashion_folder``) with ``data.image_size=64`` reaches 0.698 test accuracy after the
10 epochs (0.263 after the first): random weights transfer nothing, so this checks the path
from conversion to result, not transfer.
``reduced=True`` is a short version for tests.
"""

from configs.common import base_config
from research.config import parse_arg
from research.errors import ConfigError


def get_config(arg=None):
    arg = parse_arg(arg, checkpoint="", folder="", reduced=False)
    if not arg.checkpoint or not arg.folder:
        raise ConfigError("configs/finetune.py needs checkpoint=DIR (scripts.convert's output or "
                          "a run's workdir) and folder=PATH (one subfolder of images per class): "
                          "configs/finetune.py:checkpoint=runs/r18,folder=~/photos")
    c = base_config()
    c.name = "finetune"
    c.init.checkpoint = arg.checkpoint
    c.data.name = f"folder:{arg.folder}"
    c.data.augment = "inception"
    c.data.crop_scale = (0.25, 1.0)
    c.data.flip = 0.5
    c.data.workers = 2
    c.optim.lr = 0.01
    c.optim.warmup_steps = 20
    c.train.epochs = 10.0
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    if arg.reduced:
        c.data.workers = 0
        c.data.image_size = 32
        c.optim.warmup_steps = 0
        c.train.epochs = 2.0
        c.train.batch_size = 8
        c.train.eval_batch_size = 8
    return c
