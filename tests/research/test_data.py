import numpy as np
import pytest
import tensorflow_datasets as tfds

from research import data
from research.errors import DataError


def data_cfg(make_config, overrides=""):
    return make_config("fashion_mnist.py", overrides).data


def test_fashion_mnist_splits_sizes_and_labels(make_config):
    cfg = data_cfg(make_config)
    train, test = data.load_splits(cfg, seed=0)
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.image_shape == (28, 28, 1)
    assert set(np.unique(train.labels)) == set(range(10)) == set(np.unique(test.labels))
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_class_subset_is_relabelled(make_config):
    cfg = data_cfg(make_config, "data.classes=(5,6,7,8,9)")
    train, test = data.load_splits(cfg, seed=0)
    assert (len(train), len(test), train.num_classes) == (30_000, 5_000, 5)
    assert np.unique(test.labels).tolist() == [0, 1, 2, 3, 4]
    images, labels = test.read_batch(np.arange(4))
    original = data.all_labels(data.data_source(cfg, "test"))[test.indices[:4]]
    assert (labels + 5).tolist() == original.tolist()


def test_few_shot_has_n_per_class_chosen_by_seed_alone(make_config):
    cfg = data_cfg(make_config, "data.classes=(5,6,7,8,9),data.per_class=7")
    first, _ = data.load_splits(cfg, seed=3)
    again, _ = data.load_splits(cfg, seed=3)
    other, _ = data.load_splits(cfg, seed=4)
    assert np.bincount(first.labels).tolist() == [7] * 5
    np.testing.assert_array_equal(first.indices, again.indices)
    assert not np.array_equal(first.indices, other.indices)


def test_digits_splits(make_config):
    cfg = data_cfg(make_config, "data.name='digits'")
    train, test = data.load_splits(cfg, seed=0)
    assert (len(train), len(test), train.image_shape) == (1437, 360, (8, 8, 1))
    assert set(np.unique(train.labels)) == set(range(10))
    images, _ = train.read_batch(np.arange(len(train)))
    assert images.dtype == np.uint8 and images.max() > 200


def test_any_tfds_dataset_reads_through_the_same_path(make_config):
    cfg = data_cfg(make_config, "data.name='mnist',data.classes=(0,1,2),data.per_class=2")
    with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
        train, test = data.load_splits(cfg, seed=0)
        images, labels = next(data.train_batches(train, 4, seed=0))
    assert len(train) == 6 and train.num_classes == 3
    assert images.shape == (4, 28, 28, 1) and set(labels.tolist()) <= {0, 1, 2}


def test_batch_k_depends_only_on_seed_and_k(make_config):
    train, _ = data.load_splits(data_cfg(make_config, "data.per_class=20"), seed=0)
    from_start = data.train_batches(train, 16, seed=5)
    batches = [next(from_start) for _ in range(30)]  # crosses epoch boundaries (12 per epoch)
    resumed = next(data.train_batches(train, 16, seed=5, start_step=29))
    np.testing.assert_array_equal(resumed[0], batches[29][0])
    np.testing.assert_array_equal(resumed[1], batches[29][1])
    assert not np.array_equal(batches[0][1], batches[12][1])  # each epoch is reshuffled


def test_eval_batches_cover_every_example_once(make_config):
    _, test = data.load_splits(data_cfg(make_config, "data.name='digits'"), seed=0)
    batches = list(data.eval_batches(test, 64))
    assert sum(int(mask.sum()) for _, _, mask in batches) == 360
    labels = np.concatenate([l[m] for _, l, m in batches])
    np.testing.assert_array_equal(labels, test.labels)


def test_missing_idx_files_say_how_to_install(make_config, tmp_path):
    cfg = data_cfg(make_config, f"data.idx_dir='{tmp_path}',data.tfds_dir='{tmp_path / 'tfds'}'")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as e:
        data.load_splits(cfg, seed=0)
    assert "data.idx_dir" in str(e.value)


def test_truncated_idx_file_is_reported(tmp_path):
    source = data.find_idx_file(__import__("pathlib").Path(data.DEBIAN_FASHION_MNIST),
                                "t10k-labels-idx1-ubyte")
    import gzip
    raw = gzip.open(source).read()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw[:500])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(tmp_path / "t10k-labels-idx1-ubyte")


def test_unprepared_tfds_dataset_says_how_to_build_it(make_config, tmp_path):
    cfg = data_cfg(make_config, f"data.name='cifar10',data.tfds_dir='{tmp_path}'")
    with pytest.raises(DataError, match="tfds build cifar10 --file_format=array_record"):
        data.load_splits(cfg, seed=0)
