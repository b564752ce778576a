"""The sections every training config has, with their defaults.

Sections: ``model`` (registry name and options), ``init`` (checkpoint to start from, what not to
load), ``data``, ``freeze`` (depth and/or regexes), ``optim``, ``train`` and ``mesh``.
"""

import ml_collections

from research.data import DEBIAN_FASHION_MNIST


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "train"

    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # empty: the checkpoint's architecture
    c.model.options = ml_collections.ConfigDict()

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # a run's workdir or scripts.convert's output; empty: from scratch
    c.init.dont_load = ("head/.*",)  # regexes of paths that stay freshly initialised
    c.init.zero_head = False  # zero the parameters that dont_load kept fresh

    c.data = ml_collections.ConfigDict()
    c.data.name = "fashion_mnist"  # fashion_mnist, digits, TFDS (array_record), folder:PATH
    c.data.idx_dir = DEBIAN_FASHION_MNIST
    c.data.tfds_dir = ""  # empty: TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    c.data.train_split = "train"
    c.data.test_split = "test"
    c.data.image_key = "image"
    c.data.label_key = "label"
    c.data.classes = ()  # a subset of the labels, relabelled 0..k-1; empty: all
    c.data.per_class = 0  # few-shot: training examples per class, chosen by train.seed; 0: all
    c.data.holdout = 0.0  # a fraction of the training examples held out as the test split; 0: none
    c.data.image_size = 0  # resize to this on device; 0: the checkpoint's or the images' size
    c.data.mean = ml_collections.FieldReference(None, field_type=tuple)  # 0–255 scale
    c.data.std = ml_collections.FieldReference(None, field_type=tuple)
    # Images of varying size or augmented: decoded and cropped on the host (research.pipeline).
    c.data.workers = 0  # grain worker processes decoding and augmenting; 0: this process
    c.data.augment = ""  # training crop: "" the evaluation's, "inception" random resized crop
    c.data.crop_scale = (0.08, 1.0)  # inception crop: its share of the image's area
    c.data.crop_ratio = (3 / 4, 4 / 3)  # inception crop: its range of aspect ratios
    c.data.flip = 0.0  # probability of a horizontal flip in training
    c.data.crop_fraction = 0.0  # eval centre crop / resized short side; 0: checkpoint's, else 1
    c.data.test_fraction = 0.2  # image folder without a test/ folder: share of each class held out
    c.data.vtab1k = ""  # "tune": 800 train, 200 validation examples; "final": 1000 train; "": off

    c.freeze = ml_collections.ConfigDict()
    c.freeze.depth = 0  # freeze the first n of model.blocks
    c.freeze.regex = ()  # and every parameter whose path matches one of these in full
    c.freeze.cache_prefix = False  # compute the frozen prefix once per example, train on it
    c.freeze.bn_policy = "batch"  # trainable BatchNorm: batch statistics, or "frozen" (running)
    c.freeze.unfreeze_every_epochs = 0.0  # head only, then a block more every k epochs; 0: off
    c.freeze.probe_epochs = 0.0  # LP-FT: a linear probe first for this long, then fine-tune; 0: off
    c.freeze.probe_lr = 0.0  # the probe's peak learning rate; 0: optim.lr

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # sgd or adamw
    c.optim.lr = 0.05
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.grad_clip = 0.0  # global-norm clipping of the trainable gradients; 0: none
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.lr_mults = ()  # ((regex, multiplier > 0), …): first full match wins; others 1
    c.optim.layer_decay = 0.0  # lr × this^(blocks below the head), timm's; 0 or 1: off

    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    c.train.epochs = 5.0
    c.train.batch_size = 64
    c.train.eval_batch_size = 512
    c.train.label_smoothing = 0.0
    c.train.aux_loss_weight = 0.4  # per auxiliary head (GoogLeNet, Inception v3) in train mode
    c.train.dtype = "float32"  # computation dtype (float32, bfloat16); parameters stay float32
    c.train.accum_steps = 1  # micro-batches a step's batch is split into, one update
    c.train.eval_every_epochs = 1.0  # 0: evaluate only at the end
    c.train.checkpoint_every_epochs = 1.0  # 0: checkpoint only at the end
    c.train.keep_checkpoints = 2
    c.train.progress = True
    c.train.allow_config_change = False  # resume a workdir trained under another config

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the data axis; -1: all (divided by fsdp)
    c.mesh.fsdp = 1  # devices sharing each parameter's and optimizer state's shards
    return c


def sweep_config() -> ml_collections.ConfigDict:
    """A sweep's section (research.ablate): its grid points, seeds and plot."""
    c = ml_collections.ConfigDict()
    c.grid = ()  # points: dicts of dotted config keys (and labels, keys without a dot) → values
    c.seeds = (0,)  # every point runs once per seed (train.seed)
    c.x = "freeze_depth"  # the plot's x axis: a results.csv column
    c.lines = ("regime",)  # the columns whose values tell the plot's lines apart
    c.show = ()  # the lines the plot draws (their labels); empty: all
    c.holdout = 0.2  # the validation fraction of the training examples for a point's "choose"
    return c
