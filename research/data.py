"""Datasets as TFDS array_record data sources, fed by grain.

Fashion-MNIST (from its IDX files) and scikit-learn's digits have builders here; any other TFDS
dataset prepared in array_record form is read by name through the same path. Class subsets and
few-shot subsets are options of every dataset (``data.classes``, ``data.per_class``).

Batches are ``(images uint8 NHWC, labels int32)``; normalisation and resizing happen on the device
(``research.preprocess``), so the host ships 4× fewer bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import struct
from pathlib import Path
from typing import Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from research.errors import DataError

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
    """Fashion-MNIST from its four IDX files (Debian's ``dataset-fashion-mnist`` by default)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, idx_dir: str = DEBIAN_FASHION_MNIST, **kwargs):
        self._idx_dir = Path(idx_dir)
        super().__init__(**kwargs)

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

    def __len__(self):
        return len(self.indices)

    def read_batch(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of the examples at ``positions``, in one read."""
        records = read_records(self.source, self.indices[positions])
        return np.stack([r[self.image_key] for r in records]), self.labels[positions]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.read_batch(np.array([0]))[0].shape[1:]


def data_source(cfg, split: str):
    """The data source of ``split`` of ``cfg.name`` (fashion_mnist, digits, or a TFDS name)."""
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
    except (tfds.core.registered.DatasetNotFoundError, AssertionError, FileNotFoundError,
            NotImplementedError, ValueError, KeyError) as e:
        raise DataError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in array_record form "
            f"under {data_dir or tfds.core.constants.DATA_DIR} ({type(e).__name__}: {e}). "
            f"Prepare it with `tfds build {name} --file_format=array_record"
            f"{' --data_dir ' + data_dir if data_dir else ''}`, or set data.tfds_dir to where it "
            "is.") from None


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


def make_split(source, cfg, *, few_shot: bool, seed: int) -> Split:
    """Restrict ``source`` to ``cfg.classes`` (relabelled 0..k-1) and, if ``few_shot``,
    to ``cfg.per_class`` examples per class chosen by ``seed``."""
    labels = all_labels(source, cfg.label_key)
    classes = tuple(cfg.classes) if cfg.classes else tuple(range(int(labels.max()) + 1))
    unknown = set(cfg.classes) - set(np.unique(labels).tolist())
    if unknown:
        raise DataError(f"data.classes names classes {sorted(unknown)} that {cfg.name} does not "
                        f"have; its labels are {sorted(np.unique(labels).tolist())}.")
    relabel = {c: i for i, c in enumerate(classes)}
    indices = np.flatnonzero(np.isin(labels, classes))
    if few_shot and cfg.per_class:
        indices = _few_shot(indices, labels, cfg.per_class, seed)
    new_labels = np.array([relabel[int(labels[i])] for i in indices], np.int32)
    return Split(source, indices, new_labels, len(classes), cfg.image_key)


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


def load_splits(cfg, seed: int) -> tuple[Split, Split]:
    """The train split (few-shot if asked) and the full test split, both class-restricted;
    with ``data.holdout``, the test split is a validation split held out of the training one."""
    train = make_split(data_source(cfg, cfg.train_split), cfg, few_shot=True, seed=seed)
    if cfg.get("holdout"):
        return hold_out(train, cfg.holdout, seed)
    test = make_split(data_source(cfg, cfg.test_split), cfg, few_shot=False, seed=seed)
    return train, test


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


def train_dataset(split: Split, batch_size: int, seed: int) -> grain.MapDataset:
    """Endless shuffled batches; batch ``k`` is a function of ``seed`` and ``k`` alone.

    Each epoch is a fresh permutation; the last incomplete batch of an epoch is dropped.
    """
    if len(split) < batch_size:
        raise DataError(f"the training split has {len(split)} examples, fewer than one batch of "
                        f"{batch_size}: lower train.batch_size.")
    return (grain.MapDataset.range(len(split)).shuffle(seed=seed)
            .batch(batch_size, drop_remainder=True).repeat().map(split.read_batch))


def train_batches(split: Split, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  prefetch_threads: int = 2) -> Iterator:
    """Batches from step ``start_step`` on; each process reads its own slice of every batch."""
    ds = train_dataset(split, batch_size * process_count, seed)[start_step:]
    ds = ds.map(lambda b: process_rows(b, process_index, process_count))
    read = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(read))


def process_rows(arrays, process_index: int, process_count: int) -> tuple:
    """This process's contiguous block of rows: the global batch is the blocks in order."""
    return tuple(np.array_split(a, process_count)[process_index] for a in arrays)


def eval_batches(split: Split, batch_size: int) -> Iterator:
    """Every example once, in order: ``(images, labels, mask)``, the last batch padded."""
    ds = grain.MapDataset.range(len(split)).batch(batch_size).map(split.read_batch)
    for images, labels in ds.to_iter_dataset(grain.ReadOptions(num_threads=2)):
        n = len(labels)
        mask = np.arange(batch_size) < n
        if n < batch_size:
            pad = [(0, batch_size - n)] + [(0, 0)] * (images.ndim - 1)
            images, labels = np.pad(images, pad), np.pad(labels, (0, batch_size - n))
        yield images, labels, mask
