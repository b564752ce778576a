"""Images of any size into batches of one shape: image folders, decoding and augmentation.

An image folder (``data.name="folder:PATH"``) has one subfolder per class, named by the class,
of JPEG or PNG files of any size, under ``PATH/train`` and ``PATH/test`` (the config's
``data.train_split`` / ``data.test_split``), or directly under ``PATH``, where a seeded share
of each class (``data.test_fraction``) is held out for testing. Every image is decoded once
when the split is built, so an unreadable or truncated file stops the run before any step.

A ``Transform`` turns one decoded image (a file's path or a TFDS record's array) into a
``size``×``size`` uint8 array with PIL: for evaluation the weights' own transform (resize the
short side to ``size / crop_fraction``, centre crop, their interpolation: torchvision's
``Resize`` then ``CenterCrop``), for training optionally torchvision's ``RandomResizedCrop``
("inception" crop, its ``scale`` and ``ratio``) and a horizontal flip with probability
``flip``. Images are converted to the transform's channels (RGB: grayscale replicated,
alpha dropped; or grayscale). Training randomness is a function of the seed, the step and
the row in the batch alone, so batches do not depend on the number of worker processes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from research.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
FOLDER_PREFIX = "folder:"
HOLDOUT_SEED = 0


@dataclasses.dataclass(eq=False)
class FolderSource:
    """A split of an image folder as a data source: records ``{"image": path, "label": k}``."""

    files: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.files[index], "label": int(self.labels[index])}


@functools.lru_cache(maxsize=8)
def folder_source(root: str, split: str, test_fraction: float) -> FolderSource:
    """``split`` of the image folder ``root``: ``root/<split>/<class>/*`` if ``root/<split>``
    exists, else ``root/<class>/*`` held out by ``test_fraction`` (``split`` named "test" gets
    the held-out share). Every image is checked to decode."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.name={FOLDER_PREFIX}{root}: {root} is not a directory; give the "
                        "folder holding one subfolder of images per class.")
    if (path / split).is_dir():
        source = _scan(path / split)
        if split != "train" and (path / "train").is_dir():
            source = _with_train_classes(source, _class_dirs(path / "train"), path / split)
    else:
        source = _held_out(_scan(path), split, test_fraction)
    check_images(source.files)
    return source


def _class_dirs(path: Path) -> list[Path]:
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{path} has no class subfolders: put each class's images in "
                        f"{path}/<class name>/ (or in train/<class name>/ and test/<class name>/).")
    return classes


def _images(class_dir: Path) -> list[str]:
    files = sorted(str(f) for f in class_dir.iterdir()
                   if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}):"
                        " add some, or remove the folder.")
    return files


def _scan(path: Path) -> FolderSource:
    classes = _class_dirs(path)
    per_class = [_images(d) for d in classes]
    labels = np.concatenate([np.full(len(f), k, np.int64) for k, f in enumerate(per_class)])
    return FolderSource([f for files in per_class for f in files], labels,
                        tuple(d.name for d in classes))


def _with_train_classes(source: FolderSource, train_classes: list[Path],
                        path: Path) -> FolderSource:
    """A test folder's labels numbered as the train folder's classes."""
    names = tuple(d.name for d in train_classes)
    unknown = sorted(set(source.class_names) - set(names))
    if unknown:
        raise DataError(f"{path} has classes {unknown} that {path.parent}/train has not: "
                        "every test class needs training images.")
    relabel = np.array([names.index(n) for n in source.class_names])
    return FolderSource(source.files, relabel[source.labels], names)


def _held_out(source: FolderSource, split: str, test_fraction: float) -> FolderSource:
    """The ``test_fraction`` of each class chosen with seed ``HOLDOUT_SEED`` ("test"), or the
    rest (any other split name)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction={test_fraction}: an image folder without a "
                          f"{split}/ subfolder holds out this share of each class for testing; "
                          "use a fraction between 0 and 1.")
    rng = np.random.default_rng(HOLDOUT_SEED)
    chosen = []
    for k, name in enumerate(source.class_names):
        members = np.flatnonzero(source.labels == k)
        if len(members) < 2:
            raise DataError(f"class folder {name!r} has {len(members)} image: too few to hold "
                            f"out data.test_fraction={test_fraction} for testing; add images, "
                            "or give train/ and test/ subfolders.")
        held = max(1, min(len(members) - 1, round(len(members) * test_fraction)))
        chosen.append(rng.choice(members, held, replace=False))
    test = np.isin(np.arange(len(source)), np.concatenate(chosen))
    keep = np.flatnonzero(test if split == "test" else ~test)
    return FolderSource([source.files[i] for i in keep], source.labels[keep], source.class_names)


def check_images(files: list[str]) -> None:
    """Decode every file (in threads, as PIL decodes without the GIL; JPEGs at reduced scale,
    which reads them to the end): the first that fails raises one line naming it."""
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for failure in pool.map(_decode_failure, files):
            if failure:
                raise DataError(failure)


def _decode_failure(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (1, 1))  # JPEGs decode at 1/8 scale, still to their end
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return (f"{path} cannot be decoded as an image ({e}): the file is truncated, corrupt "
                "or not a JPEG/PNG; replace or delete it.")
    return None


def to_image(image, channels: int) -> Image.Image:
    """A file path or an HWC uint8 array as a PIL image of ``channels`` (3: RGB, 1: L)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB" if channels == 3 else "L")
        return image
    array = np.asarray(image)
    image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    return image.convert("RGB" if channels == 3 else "L")


def to_array(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, np.uint8)
    return array[..., None] if array.ndim == 2 else array


@dataclasses.dataclass(frozen=True)
class Transform:
    """One image → a ``size``×``size``×``channels`` uint8 array (``size`` 0: the image's own
    size, converted only). Evaluation: resize the short side to ``resize``, centre crop.
    Training: an inception crop (``crop_scale``, ``crop_ratio``) resized to ``size`` if
    ``inception_crop``, else the evaluation transform; then a flip with probability ``flip``."""

    size: int
    resize: int
    interpolation: str = "bilinear"
    channels: int = 3
    inception_crop: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.0

    @property
    def resample(self):
        return INTERPOLATIONS[self.interpolation]

    @property
    def augments(self) -> bool:
        return self.inception_crop or self.flip > 0

    def eval(self, image) -> np.ndarray:
        return to_array(self._resize_and_crop(to_image(image, self.channels)))

    def train(self, image, rng: np.random.Generator) -> np.ndarray:
        image = to_image(image, self.channels)
        if self.inception_crop and self.size:
            box = inception_crop_box(image.size, self.crop_scale, self.crop_ratio, rng)
            image = image.resize((self.size, self.size), self.resample, box=box)
        else:
            image = self._resize_and_crop(image)
        if self.flip and rng.random() < self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_array(image)

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        if not self.size:
            return image
        width, height = image.size
        short, long = sorted((width, height))
        scaled = (self.resize, int(self.resize * long / short))
        new_w, new_h = scaled if width <= height else scaled[::-1]
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), self.resample)
        left, top = int(round((new_w - self.size) / 2)), int(round((new_h - self.size) / 2))
        return image.crop((left, top, left + self.size, top + self.size))


def inception_crop_box(image_size: tuple[int, int], scale, ratio, rng: np.random.Generator):
    """torchvision's ``RandomResizedCrop.get_params``: a box of a random share ``scale`` of
    the area and aspect ratio in ``ratio`` (log-uniform), ten tries, then the central crop
    of the whole image clamped to ``ratio``. ``(left, top, right, bottom)``."""
    width, height = image_size
    area, log_ratio = width * height, np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < min(ratio):
        h = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(height * max(ratio)))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def make_transform(data_cfg, spec: dict | None, channels: int) -> Transform:
    """The transform of ``data_cfg`` (augmentation, ``image_size``, ``crop_fraction``) where it
    sets them, else of the preprocessing ``spec`` (the weights' input size, crop and
    interpolation)."""
    spec = spec or {}
    size = int(data_cfg.image_size or spec.get("input_size") or 0)
    fraction = float(data_cfg.get("crop_fraction") or spec.get("crop_fraction") or 1.0)
    if not 0 < fraction <= 1:
        raise ConfigError(f"data.crop_fraction={fraction}: the centre crop would be larger than "
                          "the resized image; use a fraction in (0, 1] (1: no border cut).")
    scale, ratio = tuple(data_cfg.get("crop_scale", (0.08, 1.0))), tuple(
        data_cfg.get("crop_ratio", (3 / 4, 4 / 3)))
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"data.crop_scale={scale}: the inception crop's share of the image's "
                          "area, (low, high) with 0 < low <= high <= 1; a crop cannot be larger "
                          "than the image.")
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        raise ConfigError(f"data.crop_ratio={ratio}: (low, high) aspect ratios, 0 < low <= high.")
    interpolation = spec.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation {interpolation!r} of the preprocessing is not one of "
                          f"{sorted(INTERPOLATIONS)}.")
    augment = data_cfg.get("augment", "")
    if augment not in ("", "inception"):
        raise ConfigError(f"data.augment={augment!r}; use '' (none) or 'inception' (random "
                          "resized crop, data.crop_scale and data.crop_ratio).")
    flip = float(data_cfg.get("flip", 0.0))
    if not 0 <= flip <= 1:
        raise ConfigError(f"data.flip={flip}: the probability of a horizontal flip, in [0, 1].")
    return Transform(size, int(round(size / fraction)), interpolation, channels,
                     augment == "inception", scale, ratio, flip)
