"""Image folders, TFDS images of varying size, and the host pipeline (research.pipeline)."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from research import data, pipeline
from research.errors import ConfigError, DataError

SIZES = ((28, 28), (40, 52), (64, 36))  # (width, height) the Fashion-MNIST images are written at


def write_fashion_folder(root: Path, per_class: int = 6, classes=(0, 1, 7), test: bool = False,
                         split: str = "test") -> Path:
    """``root/[train|test]/<class name>/*.png|jpg``: Fashion-MNIST images resized with PIL to
    each of ``SIZES`` in turn, RGB PNGs, with a grayscale PNG and an RGBA PNG among them."""
    images, labels = (data.read_idx(data.find_idx_file(Path(data.DEBIAN_FASHION_MNIST), stem))
                      for stem in data.IDX_FILES["test"])
    splits = ("train", split) if test else ("",)
    for s, name in enumerate(splits):
        for c in classes:
            folder = root / name / data.FASHION_MNIST_CLASSES[c].replace("/", "-")
            folder.mkdir(parents=True)
            members = np.flatnonzero(labels == c)[s * per_class:(s + 1) * per_class]
            for i, index in enumerate(members):
                image = Image.fromarray(images[index]).resize(SIZES[i % len(SIZES)])
                mode = {1: "L", 2: "RGBA"}.get(i, "RGB")
                image.convert(mode).save(folder / f"{index}.{'jpg' if i == 3 else 'png'}")
    return root


@pytest.fixture(autouse=True)
def fresh_sources():
    """Data sources are cached by name: each test's mock_data has its own."""
    data._data_source.cache_clear()
    yield
    data._data_source.cache_clear()


def folder_cfg(make_config, root, overrides=""):
    return make_config("fashion_mnist.py", f"data.name='folder:{root}',data.image_size=32"
                       + ("," + overrides if overrides else "")).data


def fitted(make_config, overrides="", spec=None):
    cfg = make_config("fashion_mnist.py", overrides)
    train, test = data.load_splits(cfg.data, seed=0)
    return data.fit_pipeline(cfg, spec or {}, train, test)


def test_folder_holds_out_a_seeded_share_and_names_the_classes(make_config, tmp_path):
    root = write_fashion_folder(tmp_path / "f")
    train, test = fitted(make_config, f"data.name='folder:{root}',data.image_size=32,"
                         "data.test_fraction=0.34")
    assert (len(train), len(test)) == (12, 6)  # 6 per class, 0.34 of them (2) held out
    names = sorted(data.FASHION_MNIST_CLASSES[c].replace("/", "-") for c in (0, 1, 7))
    assert train.class_names == test.class_names == tuple(names)
    assert not set(train.source.files) & set(test.source.files)
    assert np.bincount(test.labels).tolist() == [2, 2, 2]
    again = pipeline.folder_source.__wrapped__(str(root), "test", 0.34)
    assert again.files == test.source.files


def test_folder_with_train_and_test_folders(make_config, tmp_path):
    root = write_fashion_folder(tmp_path / "f", per_class=4, test=True, split="val")
    cfg = make_config("fashion_mnist.py", f"data.name='folder:{root}',data.image_size=24,"
                      "data.test_split='val'")
    train, test = data.fit_pipeline(cfg, {}, *data.load_splits(cfg.data, seed=0))
    assert (len(train), len(test), train.num_classes) == (12, 12, 3)
    assert all("/val/" in f for f in test.source.files)
    images, labels = test.read_batch(np.arange(12))
    assert images.shape == (12, 24, 24, 3) and images.dtype == np.uint8
    names = [Path(f).parent.name for f in np.array(test.source.files)[test.indices]]
    assert [train.class_names[k] for k in labels] == names


def test_evaluation_is_torchvisions_resize_and_centre_crop():
    tv = pytest.importorskip("torchvision.transforms",
                             reason="the reference transform needs torchvision")
    image = np.random.default_rng(0).integers(0, 256, (77, 130, 3), np.uint8)
    for interpolation in ("bilinear", "bicubic"):
        transform = pipeline.Transform(size=48, resize=55, interpolation=interpolation)
        reference = tv.Compose([tv.Resize(55, tv.InterpolationMode(interpolation)),
                                tv.CenterCrop(48)])
        np.testing.assert_array_equal(transform.eval(image),
                                      np.asarray(reference(Image.fromarray(image))))


def test_inception_crop_and_flip_follow_seed_step_and_row(make_config, tmp_path):
    root = write_fashion_folder(tmp_path / "f")
    train, _ = fitted(make_config, f"data.name='folder:{root}',data.image_size=32,"
                      "data.augment='inception',data.flip=0.5")
    batches = data.train_batches(train, 4, seed=1)
    first = [next(batches) for _ in range(4)]
    resumed = next(data.train_batches(train, 4, seed=1, start_step=3))
    np.testing.assert_array_equal(resumed[0], first[3][0])
    assert first[0][0].shape == (4, 32, 32, 3)
    plain = train.read_batch(np.arange(4))[0]
    rows = np.arange(4)
    augmented = train.read_train_batch(1, rows, 0, np.arange(4))[0]
    assert not np.array_equal(plain, augmented)
    assert not np.array_equal(augmented, train.read_train_batch(1, rows, 1, np.arange(4))[0])
    # Two processes' halves of a batch are the rows of the whole, augmented alike.
    halves = [next(data.train_batches(train, 2, seed=1, process_index=i, process_count=2))[0]
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), first[0][0])


def test_flip_with_probability_one_mirrors_the_evaluation_image():
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
    flip = pipeline.Transform(size=32, resize=32, flip=1.0)
    np.testing.assert_array_equal(flip.train(image, np.random.default_rng(0)),
                                  flip.eval(image)[:, ::-1])


def test_inception_crop_box_stays_inside_and_within_its_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        width, height = rng.integers(8, 300, 2)
        left, top, right, bottom = pipeline.inception_crop_box((width, height), (0.3, 0.6),
                                                               (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert (right - left) * (bottom - top) <= 0.6 * width * height + width + height


def test_workers_give_the_batches_of_this_process(make_config, tmp_path):
    root = write_fashion_folder(tmp_path / "f")
    overrides = f"data.name='folder:{root}',data.image_size=32,data.augment='inception'"
    alone, _ = fitted(make_config, overrides)
    pooled, test = fitted(make_config, overrides + ",data.workers=2")
    expected = data.train_batches(alone, 4, seed=0)
    got = data.train_batches(pooled, 4, seed=0)
    for _ in range(5):
        for a, b in zip(next(expected), next(got), strict=True):
            np.testing.assert_array_equal(a, b)
    assert sum(int(m.sum()) for _, _, m in data.eval_batches(test, 4)) == len(test)


@pytest.mark.parametrize("name", ["cifar10", "oxford_flowers102", "oxford_iiit_pet", "dtd"])
def test_tfds_catalog_datasets_batch_to_one_shape(make_config, name):
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        train, test = fitted(make_config, f"data.name='{name}',"
                             "data.augment='inception',data.flip=0.5",
                             spec=dict(input_size=40, crop_fraction=0.875))
        images, labels = next(data.train_batches(train, 4, seed=0))
        eval_images, _, _ = next(data.eval_batches(test, 4))
    info = tfds.builder(name).info.features["label"]
    assert train.class_names == tuple(info.names) and len(info.names) == train.num_classes
    assert images.shape == eval_images.shape == (4, 40, 40, 3)
    assert set(labels.tolist()) <= set(range(train.num_classes))


def test_tfds_images_of_one_shape_are_batched_as_stored(make_config):
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        train, _ = fitted(make_config, "data.name='cifar10'")
    assert train.transform is None and train.image_shape == (32, 32, 3)


def test_vtab1k_splits(make_config):
    with tfds.testing.mock_data(num_examples=1100, policy=tfds.testing.MockPolicy.USE_CODE):
        tune = data.load_splits(make_config("fashion_mnist.py", "data.name='dtd',"
                                            "data.vtab1k='tune'").data, seed=0)
        final = data.load_splits(make_config("fashion_mnist.py", "data.name='dtd',"
                                             "data.vtab1k='final'").data, seed=0)
    assert (len(tune[0]), len(tune[1]), len(final[0]), len(final[1])) == (800, 200, 1000, 1100)
    assert tune[0].indices.max() == 799 and tune[1].indices.min() == 800
    np.testing.assert_array_equal(final[0].indices, np.arange(1000))


def test_vtab1k_needs_1000_training_examples(make_config):
    with tfds.testing.mock_data(num_examples=50, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(DataError, match=r"has 50 examples, and VTAB-1k takes its first 1000"):
            data.load_splits(make_config("fashion_mnist.py", "data.name='dtd',"
                                         "data.vtab1k='tune'").data, seed=0)


def test_grayscale_and_rgba_images_are_converted_to_rgb(make_config, tmp_path):
    root = write_fashion_folder(tmp_path / "f")
    train, _ = fitted(make_config, f"data.name='folder:{root}',data.image_size=20")
    modes = [Image.open(f).mode for f in train.source.files]
    assert {"L", "RGBA", "RGB"} <= set(modes)
    images, _ = train.read_batch(np.arange(len(train)))
    assert images.shape == (len(train), 20, 20, 3)
    gray = modes.index("L")
    np.testing.assert_array_equal(images[gray, ..., 0], images[gray, ..., 2])


@pytest.mark.parametrize("damage,match", [
    ("empty", r"has no class subfolders"),
    ("no_images", r"class folder .*Trouser holds no images"),
    ("truncated", r"\d+\.jpg cannot be decoded as an image .*truncated"),
    ("not_an_image", r"\d+\.(png|jpg) cannot be decoded as an image"),
    ("missing", r"is not a directory"),
])
def test_bad_folders_name_the_file_and_the_fix(make_config, tmp_path, damage, match):
    root = tmp_path / "f"
    if damage == "empty":
        root.mkdir()
    elif damage != "missing":
        write_fashion_folder(root)
        files = sorted((root / "Trouser").iterdir())
        if damage == "no_images":
            for f in files:
                f.unlink()
        elif damage == "truncated":
            jpg = next(f for f in files if f.suffix == ".jpg")
            jpg.write_bytes(jpg.read_bytes()[:len(jpg.read_bytes()) // 2])
        else:
            files[0].write_bytes(b"not a png")
    with pytest.raises(DataError, match=match) as e:
        data.load_splits(folder_cfg(make_config, root), seed=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,match", [
    ("data.crop_fraction=1.2", r"data.crop_fraction=1.2: the centre crop would be larger"),
    ("data.crop_scale=(0.5, 1.5)", r"data.crop_scale=\(0.5, 1.5\).*cannot be larger than"),
    ("data.augment='random'", r"data.augment='random'"),
    ("data.image_size=0", r"data.image_size=0.*vary in size"),
    ("data.augment='inception',freeze.cache_prefix=True", r"freeze.cache_prefix"),
])
def test_bad_pipeline_settings_name_the_setting(make_config, tmp_path, override, match):
    root = write_fashion_folder(tmp_path / "f")
    with pytest.raises(ConfigError, match=match):
        fitted(make_config, f"data.name='folder:{root}',data.image_size=32,{override}")


def test_empty_split_is_refused(make_config):
    with tfds.testing.mock_data(num_examples=0, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(DataError, match=r"split 'train' of dtd has no examples: choose"):
            data.load_splits(make_config("fashion_mnist.py", "data.name='dtd'").data, seed=0)
