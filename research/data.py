"""Datasets as TFDS array_record data sources, fed by grain.

Fashion-MNIST (from its IDX files) and scikit-learn's digits have builders here; any other TFDS
dataset prepared in array_record form is read by name through the same path, and an image folder
as ``folder:PATH`` (``research.pipeline``). Class subsets, few-shot subsets and VTAB-1k's splits
are options of every dataset (``data.classes``, ``data.per_class``, ``data.vtab1k``).

Batches are ``(images uint8 NHWC, labels int32)``. Images of one stored shape are batched as
stored, and normalisation and resizing happen on the device (``research.preprocess``), so the
host ships 4× fewer bytes. Images of varying size (image folders, TFDS image features of no
fixed shape), or any with ``data.augment`` or ``data.flip`` set, are decoded, cropped and
augmented on the host by the split's ``pipeline.Transform``, in ``data.workers`` grain worker
processes.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gzip
import hashlib
import struct
from pathlib import Path
from typing import Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from research import checksums, pipeline
from research.errors import ConfigError, DataError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def find_idx_file(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"Fashion-MNIST's {stem}[.gz] is not in {directory}. Install the dataset with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, files under "
        f"{DEBIAN_FASHION_MNIST}), or set data.idx_dir to a directory holding the four IDX files "
        f"{', '.join(f for pair in IDX_FILES.values() for f in pair)} (optionally gzipped).")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), optionally gzipped, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} cannot be read ({e}): the file is corrupt or truncated; "
                        "reinstall it.") from None
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number).")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"{path} is truncated: its header says {shape}, it holds {len(body)} bytes.")
    return np.frombuffer(body, dtype).reshape(shape)


def _image_label_features(image_shape: Sequence[int], num_classes: int):
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=tuple(image_shape), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=num_classes),
    })


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from its four IDX files (Debian's ``dataset-fashion-mnist`` by default),
    prepared under a config named by their contents' hash: files with other contents are
    prepared anew, never read from a copy prepared from others."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, idx_dir: str = DEBIAN_FASHION_MNIST, **kwargs):
        self._idx_dir = Path(idx_dir)
        super().__init__(config=_idx_fingerprint(self._idx_dir), **kwargs)

    @classmethod
    def get_builder_config(cls, name: str, version=None) -> tfds.core.BuilderConfig:
        """Every ``idx-<hash>`` name is a config of its own (TFDS warns of configs it does not
        list)."""
        return tfds.core.BuilderConfig(name=name)

    def _info(self):
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
        })
        return self.dataset_info_from_configs(features=features,
                                              supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        files = {split: [find_idx_file(self._idx_dir, stem) for stem in stems]
                 for split, stems in IDX_FILES.items()}
        return {split: self._generate_examples(*paths) for split, paths in files.items()}

    def _generate_examples(self, images_path, labels_path):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if len(images) != len(labels):
            raise DataError(f"{images_path} holds {len(images)} images but {labels_path} "
                            f"{len(labels)} labels.")
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label)}


def _idx_fingerprint(directory: Path) -> str:
    """``idx-`` and 12 hex digits of the SHA-256 over the four IDX files' hashes."""
    files = [find_idx_file(directory, stem) for stems in IDX_FILES.values() for stem in stems]
    combined = hashlib.sha256("".join(checksums.digest(f) for f in files).encode())
    return f"idx-{combined.hexdigest()[:12]}"


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8×8 digits (values 0–16 scaled to 0–255), split 80/20 stratified, seed 0."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=_image_label_features((8, 8, 1), 10),
                                              supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]
        split = train_test_split(images, digits.target, test_size=0.2, random_state=0,
                                 stratify=digits.target)
        train_x, test_x, train_y, test_y = split
        return {"train": self._generate_examples(train_x, train_y),
                "test": self._generate_examples(test_x, test_y)}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}


_BUILDERS = {"fashion_mnist": FashionMnistIdx, "digits": SklearnDigits}
SYNTHETIC_SIZES = {"train": 4096, "test": 512}


class SyntheticSource:
    """Random uint8 images and labels, a pure function of the index: for benchmarks and tests
    of shapes no real dataset here has. Named ``synthetic:HxWxC:K`` (K classes)."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, size: int, seed: int):
        self.shape, self.num_classes, self.size, self.seed = shape, num_classes, size, seed

    @classmethod
    def from_name(cls, name: str, split: str) -> "SyntheticSource":
        try:
            _, shape, classes = name.split(":")
            shape = tuple(int(d) for d in shape.split("x"))
            return cls(shape, int(classes), SYNTHETIC_SIZES[split], sorted(SYNTHETIC_SIZES).index(split))
        except (ValueError, KeyError):
            raise DataError(f"data.name={name!r}: synthetic data is named synthetic:HxWxC:K "
                            f"(e.g. synthetic:224x224x3:1000) with splits "
                            f"{sorted(SYNTHETIC_SIZES)}.") from None

    def __len__(self):
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, index))
        return {"image": rng.integers(0, 256, self.shape, np.uint8),
                "label": int(rng.integers(self.num_classes))}


@dataclasses.dataclass
class Split:
    """A split's data source restricted to ``indices``, labels relabelled 0..k-1."""

    source: Sequence
    indices: np.ndarray
    labels: np.ndarray  # relabelled labels of ``indices``
    num_classes: int
    image_key: str = "image"
    class_names: tuple[str, ...] = ()  # of the relabelled classes, where the dataset names them
    transform: pipeline.Transform | None = None  # None: images of one shape, batched as stored
    workers: int = 0  # grain worker processes reading and transforming; 0: this process

    def __len__(self):
        return len(self.indices)

    def read_batch(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of the examples at ``positions``, in one read (images through
        the transform's evaluation path, if any)."""
        records = read_records(self.source, self.indices[positions])
        images = [r[self.image_key] for r in records]
        if self.transform is not None:
            images = [self.transform.eval(image) for image in images]
        return np.stack(images), self.labels[positions]

    def read_train_batch(self, seed: int, rows: np.ndarray, step: int,
                         positions: np.ndarray) -> tuple:
        """``rows`` of training batch ``step`` (of the examples at ``positions``): ``read_batch``,
        augmented where the transform augments, row ``r``'s randomness drawn from
        ``(seed, step, r)`` alone."""
        positions = positions[rows]
        if self.transform is None or not self.transform.augments:
            return self.read_batch(positions)
        records = read_records(self.source, self.indices[positions])
        images = [self.transform.train(r[self.image_key], np.random.default_rng((seed, step, row)))
                  for row, r in zip(rows, records)]
        return np.stack(images), self.labels[positions]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.read_batch(np.array([0]))[0].shape[1:]


def data_source(cfg, split: str):
    """The data source of ``split`` of ``cfg.name`` (fashion_mnist, digits, a TFDS name, or
    ``folder:PATH``)."""
    if cfg.name.startswith(pipeline.FOLDER_PREFIX):
        return pipeline.folder_source(cfg.name[len(pipeline.FOLDER_PREFIX):], split,
                                      float(cfg.get("test_fraction", 0.2)))
    return _data_source(cfg.name, cfg.get("tfds_dir") or None, cfg.get("idx_dir"), split)


@functools.lru_cache(maxsize=16)
def _data_source(name: str, data_dir: str | None, idx_dir: str | None, split: str):
    if name.startswith("synthetic:"):
        return SyntheticSource.from_name(name, split)
    if name in _BUILDERS:
        kwargs = {"idx_dir": idx_dir} if name == "fashion_mnist" else {}
        builder = _BUILDERS[name](data_dir=data_dir, file_format="array_record", **kwargs)
        if not builder.is_prepared():
            builder.download_and_prepare()
        if split not in builder.info.splits:
            raise DataError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}.")
        return builder.as_data_source(split=split)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(_unknown_dataset(name)) from None
    except (AssertionError, FileNotFoundError, NotImplementedError, ValueError, KeyError) as e:
        raise DataError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in array_record form "
            f"under {data_dir or tfds.core.constants.DATA_DIR} ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0]}). "
            f"Prepare it with `tfds build {name} --file_format=array_record"
            f"{' --data_dir ' + data_dir if data_dir else ''}`, or set data.tfds_dir to where it "
            "is.") from None


def _unknown_dataset(name: str) -> str:
    known = [*_BUILDERS, *tfds.core.registered.list_imported_builders()]
    close = difflib.get_close_matches(name, known, n=4)
    return (f"data.name={name!r} is no dataset here or in TFDS"
            f"{'; did you mean ' + ', '.join(close) + '?' if close else '.'} Use fashion_mnist, "
            "digits, synthetic:HxWxC:K or a prepared TFDS dataset.")


def read_records(source, indices) -> list:
    """Many records at once: array_record sources read a list of indices much faster."""
    indices = [int(i) for i in indices]
    try:
        return source.__getitems__(indices)
    except (AttributeError, TypeError):  # no batched read (tfds.testing.mock_data's sources)
        return [source[i] for i in indices]


_LABELS: dict[tuple[int, str], np.ndarray] = {}


def all_labels(source, label_key: str = "label", chunk: int = 10_000) -> np.ndarray:
    """Every label of ``source``, read once per process (sources are cached, see above)."""
    key = (id(source), label_key)
    if key not in _LABELS:
        _LABELS[key] = _read_labels(source, label_key, chunk)
    return _LABELS[key]


def _read_labels(source, label_key: str, chunk: int) -> np.ndarray:
    return np.concatenate([
        np.array([int(r[label_key]) for r in read_records(source, range(s, min(s + chunk, len(source))))],
                 np.int64)
        for s in range(0, len(source), chunk)])


def make_split(source, cfg, *, few_shot: bool, seed: int,
               span: tuple[int, int] | None = None) -> Split:
    """Restrict ``source`` to ``cfg.classes`` (relabelled 0..k-1), to the examples stored at
    ``span`` (start, stop) if given and, if ``few_shot``, to ``cfg.per_class`` examples per
    class chosen by ``seed``."""
    labels = all_labels(source, cfg.label_key)
    names = _class_names(source, cfg.label_key)
    known = list(range(len(names))) if names else np.unique(labels).tolist()
    classes = tuple(cfg.classes) if cfg.classes else tuple(range(max(known) + 1))
    unknown = set(cfg.classes) - set(known)
    if unknown:
        raise DataError(f"data.classes names classes {sorted(unknown)} that {cfg.name} does not "
                        f"have; its labels are {sorted(known)}.")
    relabel = {c: i for i, c in enumerate(classes)}
    indices = np.flatnonzero(np.isin(labels, classes))
    if span:
        indices = indices[(indices >= span[0]) & (indices < span[1])]
    if few_shot and cfg.per_class:
        indices = _few_shot(indices, labels, cfg.per_class, seed)
    new_labels = np.array([relabel[int(labels[i])] for i in indices], np.int32)
    return Split(source, indices, new_labels, len(classes), cfg.image_key,
                 tuple(names[c] for c in classes) if names else (),
                 _initial_transform(source, cfg), int(cfg.get("workers", 0)))


def _class_names(source, label_key: str) -> tuple[str, ...]:
    """Every class's name, by label: an image folder's subfolders, a TFDS ClassLabel's names;
    () where the dataset names none."""
    names = getattr(source, "class_names", None)
    if names is None:
        try:
            names = source.dataset_info.features[label_key].names
        except (AttributeError, KeyError, TypeError):
            return ()
    return tuple(str(n) for n in names or ())


def _stored_image_shape(source, image_key: str) -> tuple:
    """The images' shape as the dataset declares it (None where it varies)."""
    if isinstance(source, pipeline.FolderSource):
        return (None, None, 3)
    try:
        return tuple(source.dataset_info.features[image_key].shape)
    except (AttributeError, KeyError, TypeError):
        return np.shape(read_records(source, [0])[0][image_key])


def _initial_transform(source, cfg) -> pipeline.Transform | None:
    """None for images of one shape batched as stored; else a transform that only converts
    them (size 0), until ``fit_pipeline`` knows the size and crop."""
    shape = _stored_image_shape(source, cfg.image_key)
    if None not in shape and not cfg.get("augment") and not cfg.get("flip"):
        return None
    return pipeline.Transform(0, 0, channels=shape[-1] or 3)


def fit_pipeline(cfg, spec: dict, *splits: Split) -> tuple[Split, ...]:
    """``splits`` with the transform of ``cfg.data`` and the preprocessing ``spec`` (the
    weights' input size, crop and interpolation); splits batched as stored are unchanged."""
    if splits[0].transform is None:
        return splits
    transform = pipeline.make_transform(cfg.data, spec, splits[0].transform.channels)
    if not transform.size:
        raise ConfigError(f"data.image_size=0, and no checkpoint gives an input size: the images "
                          f"of {cfg.data.name} vary in size or are augmented, so set "
                          "data.image_size to the size to crop them to.")
    if transform.augments and cfg.freeze.get("cache_prefix"):
        raise ConfigError("freeze.cache_prefix computes the frozen prefix once per example, "
                          "which augmentation changes every step: turn data.augment and "
                          "data.flip off, or freeze.cache_prefix off.")
    return tuple(dataclasses.replace(split, transform=transform) for split in splits)


def _few_shot(indices: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels[indices]):
        members = indices[labels[indices] == c]
        if len(members) < per_class:
            raise DataError(f"class {c} has only {len(members)} examples, fewer than "
                            f"data.per_class={per_class}.")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


# VTAB-1k: the first 800 stored training examples to train and the next 200 to validate
# ("tune"), then all 1000 to train and the test split to test ("final").
VTAB1K = {"tune": ((0, 800), (800, 1000)), "final": ((0, 1000), None)}


def load_splits(cfg, seed: int) -> tuple[Split, Split]:
    """The train split (few-shot if asked) and the full test split, both class-restricted,
    or VTAB-1k's (``cfg.vtab1k``); with ``data.holdout``, the test split is a validation split
    held out of the training one."""
    train_source = _nonempty(data_source(cfg, cfg.train_split), cfg, cfg.train_split)
    spans = _vtab1k_spans(cfg, train_source)
    train = make_split(train_source, cfg, few_shot=True, seed=seed, span=spans[0])
    if cfg.get("holdout"):
        train, test = hold_out(train, cfg.holdout, seed)
    else:
        test_source = (train_source if spans[1] else
                       _nonempty(data_source(cfg, cfg.test_split), cfg, cfg.test_split))
        test = make_split(test_source, cfg, few_shot=False, seed=seed, span=spans[1])
    for split, name in ((train, cfg.train_split), (test, cfg.test_split)):
        _nonempty(split, cfg, name)
    return train, test


def _nonempty(examples, cfg, split: str):
    if not len(examples):
        raise DataError(f"split {split!r} of {cfg.name} has no examples"
                        f"{f' of data.classes={tuple(cfg.classes)}' if cfg.classes else ''}: "
                        "choose another split or classes, or add examples.")
    return examples


def _vtab1k_spans(cfg, source) -> tuple:
    vtab = cfg.get("vtab1k", "")
    if not vtab:
        return None, None
    if vtab not in VTAB1K:
        raise ConfigError(f"data.vtab1k={vtab!r}; use 'tune' (800 train, 200 validation), "
                          "'final' (1000 train, the test split) or '' (off).")
    if len(source) < 1000:
        raise DataError(f"data.vtab1k: split {cfg.train_split!r} of {cfg.name} has {len(source)} "
                        "examples, and VTAB-1k takes its first 1000: choose a larger "
                        "data.train_split or set data.vtab1k=''.")
    return VTAB1K[vtab]


def hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """``split`` divided into training examples and a validation split of ``fraction`` of
    them (``data.holdout``), stratified by class and chosen by ``seed`` (scikit-learn's
    ``train_test_split``)."""
    from sklearn.model_selection import train_test_split
    try:
        kept, held = train_test_split(np.arange(len(split)), test_size=fraction,
                                      random_state=seed, stratify=split.labels)
    except ValueError as e:
        raise DataError(f"data.holdout={fraction} cannot hold out a validation split of "
                        f"every class from {len(split)} training examples ({e}): hold out "
                        "more, or train on more examples.") from None
    part = lambda rows: dataclasses.replace(split, indices=split.indices[np.sort(rows)],
                                            labels=split.labels[np.sort(rows)])
    return part(kept), part(held)


def train_dataset(split: Split, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """Endless shuffled batches, this process's rows of each (``process_rows``), read and
    transformed alone; batch ``k`` is a function of ``seed`` and ``k`` alone.

    Each epoch is a fresh permutation; the last incomplete batch of an epoch is dropped.
    """
    if len(split) < batch_size:
        raise DataError(f"the training split has {len(split)} examples, fewer than one batch of "
                        f"{batch_size}: lower train.batch_size.")
    rows = process_rows((np.arange(batch_size),), process_index, process_count)[0]
    return (grain.MapDataset.range(len(split)).shuffle(seed=seed)
            .batch(batch_size, drop_remainder=True).repeat()
            .map_with_index(functools.partial(split.read_train_batch, seed, rows)))


def train_batches(split: Split, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  prefetch_threads: int = 2) -> Iterator:
    """Batches from step ``start_step`` on; each process reads its own slice of every batch."""
    ds = train_dataset(split, batch_size * process_count, seed, process_index,
                       process_count)[start_step:]
    read = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=4)
    return iter(_in_workers(ds.to_iter_dataset(read), split.workers))


def _in_workers(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
    """``ds`` read in ``workers`` grain worker processes (in order), or in this one."""
    if not workers:
        return ds
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags, which a library never parses
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def process_rows(arrays, process_index: int, process_count: int) -> tuple:
    """This process's contiguous block of rows: the global batch is the blocks in order."""
    return tuple(np.array_split(a, process_count)[process_index] for a in arrays)


def eval_batches(split: Split, batch_size: int) -> Iterator:
    """Every example once, in order: ``(images, labels, mask)``, the last batch padded."""
    ds = grain.MapDataset.range(len(split)).batch(batch_size).map(split.read_batch)
    for images, labels in _in_workers(ds.to_iter_dataset(grain.ReadOptions(num_threads=2)),
                                      split.workers):
        n = len(labels)
        mask = np.arange(batch_size) < n
        if n < batch_size:
            pad = [(0, batch_size - n)] + [(0, 0)] * (images.ndim - 1)
            images, labels = np.pad(images, pad), np.pad(labels, (0, batch_size - n))
        yield images, labels, mask
