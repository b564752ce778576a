"""Losing nothing: NaN losses stop the run unsaved, checkpoints are checked against their
SHA256SUMS, a rerun under another config is refused, and bad values stop a run before it
writes anything."""

import errno
import json
import logging
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from research import checkpoints, checksums, data, guard, train
from research.errors import CheckpointError, ConfigError, DataError, TrainingDiverged

DIGITS = ("data.name='digits',data.mean=(32.0,),data.std=(48.0,),model.name='lenet5',"
          "data.per_class=8,train.batch_size=16,train.epochs=1.0,train.eval_batch_size=64")


def strict_records(workdir):
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds a bare {constant}")
    return [json.loads(line, parse_constant=refuse)
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_diverging_run_stops_naming_the_step_and_saves_nothing_nonfinite(make_config, tmp_path):
    cfg = make_config("fashion_mnist.py", f"{DIGITS},optim.lr=1e9,"
                      "train.checkpoint_every_epochs=0.2,train.eval_every_epochs=0.2")
    with pytest.raises(TrainingDiverged, match=r"not finite after step \d+: .*lower optim.lr "
                                               r"\(now 1e\+09\), set optim.grad_clip"):
        train.train_and_evaluate(cfg, tmp_path)
    strict_records(tmp_path)
    assert saved_steps(tmp_path)  # the early steps' checkpoints, before it diverged
    for step in saved_steps(tmp_path):
        variables = ocp.StandardCheckpointer().restore(
            tmp_path / "checkpoints" / str(step) / "variables")
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables)), step


def test_a_nonfinite_loss_is_named_with_its_step_once_the_next_step_is_dispatched(make_config):
    watch = guard.LossWatch(make_config("fashion_mnist.py", "optim.lr=0.5"))
    watch.after_step(6, {"loss": np.float32(2.3)})
    watch.after_step(7, {"loss": np.float32(np.nan)})
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7: .*optim.lr \(now 0.5\)"):
        watch.after_step(8, {"loss": np.float32(np.nan)})


def test_metrics_records_are_strict_json():
    record = guard.json_safe({"step": 3, "train_loss": math.nan, "test_loss": math.inf,
                              "test_accuracy": 0.5})
    assert json.dumps(record, allow_nan=False) == (
        '{"step": 3, "train_loss": null, "test_loss": null, "test_accuracy": 0.5}')


def save_steps(directory, steps, keep=3):
    mngr = checkpoints.manager(directory / "checkpoints", max_to_keep=keep)
    for step in steps:
        checkpoints.save(mngr, step, {"params": {"w": np.full(4096, step, np.float32)}},
                         {"step": step}, {"step": np.array(step, np.int32)})
    mngr.close()


def largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != "SHA256SUMS"),
               key=lambda p: p.stat().st_size)


def test_overwritten_bytes_fall_back_to_the_previous_step_with_a_warning(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    assert checksums.problems(tmp_path / "checkpoints" / "2") == []
    damaged = largest_file(tmp_path / "checkpoints" / "2")
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF
    damaged.write_bytes(bytes(content))
    with caplog.at_level(logging.WARNING):
        variables, meta, _ = checkpoints.restore(tmp_path)
    assert meta == {"step": 1} and float(variables["params"]["w"][0]) == 1.0
    assert "checkpoints/2 is damaged (checksums differ" in caplog.text
    assert str(damaged.relative_to(tmp_path / "checkpoints" / "2")) in caplog.text


def test_a_truncated_only_step_is_named_damaged_with_the_fix(tmp_path):
    save_steps(tmp_path, [1])
    damaged = largest_file(tmp_path / "checkpoints" / "1")
    damaged.write_bytes(damaged.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=r"every step of .* is damaged \(1.*delete it"):
        checkpoints.restore(tmp_path)


def test_a_truncated_step_without_checksums_is_unreadable_not_a_traceback(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "2" / "SHA256SUMS").unlink()
    for truncated in (tmp_path / "checkpoints" / "2" / "variables").rglob("d/*"):
        truncated.write_bytes(truncated.read_bytes()[:7])
    with caplog.at_level(logging.WARNING):
        _, meta, _ = checkpoints.restore(tmp_path)
    assert meta == {"step": 1} and "is damaged (unreadable" in caplog.text


def test_a_full_disk_leaves_no_temporary_directory_and_the_saved_step_intact(tmp_path,
                                                                            monkeypatch):
    save_steps(tmp_path, [1])

    def no_space(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", no_space)
    with pytest.raises(CheckpointError, match="step 2 could not be saved .*step 1 is intact: "
                                              "free space"):
        save_steps(tmp_path, [2])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    monkeypatch.undo()
    assert checkpoints.restore(tmp_path)[1] == {"step": 1}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, tfds_dir):
    from research import config
    workdir = tmp_path_factory.mktemp("digits_run")
    cfg = config.load(f"configs/fashion_mnist.py:data.tfds_dir={tfds_dir},train.progress=False,"
                      f"{DIGITS},train.epochs=1.0")
    train.train_and_evaluate(cfg, workdir)
    return workdir


@pytest.mark.parametrize("change, keys", [
    ("optim.lr=0.01", "optim.lr: 0.05 → 0.01"),
    ("model.name='resnet_small'", "model.name: 'lenet5' → 'resnet_small'")])
def test_a_rerun_under_another_config_is_refused_listing_the_keys(make_config, digits_run,
                                                                  change, keys):
    before = sorted(p.name for p in digits_run.rglob("*"))
    with pytest.raises(ConfigError, match=f"another config \\({keys}\\).*"
                                          "train.allow_config_change=True") as error:
        train.train_and_evaluate(make_config("fashion_mnist.py", f"{DIGITS},{change}"),
                                 digits_run)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in digits_run.rglob("*")) == before


def test_run_length_changes_resume_and_allow_config_change_continues(make_config, digits_run,
                                                                    tmp_path):
    saved = checkpoints.read_meta(digits_run)["config"]
    longer = make_config("fashion_mnist.py", f"{DIGITS},train.epochs=2.0,"
                         "train.eval_every_epochs=0.5,train.keep_checkpoints=3")
    longer.name = "longer"
    guard.check_resumable(saved, longer)
    other = make_config("fashion_mnist.py", f"{DIGITS},optim.lr=0.01,"
                        "train.allow_config_change=True")
    guard.check_resumable(saved, other)


@pytest.mark.parametrize("overrides, match", [
    ("optim.lr=-1.0", r"optim.lr=-1.0 must be a finite number above 0"),
    ("optim.lr=0.0", r"optim.lr=0.0 must be"),
    ("train.batch_size=0", r"train.batch_size=0 must be a whole number above 0"),
    ("train.batch_size=-32", r"train.batch_size=-32 must be"),
    ("train.epochs=0.01", r"train.epochs=0.01 of \d+ steps makes no step"),
    ("model.name='resnet51'", r"model.name='resnet51' is not a model here; did you mean "
                              r"resnet50"),
    ("data.name='no_such_dataset'", r"data.name='no_such_dataset' is no dataset here")])
def test_bad_values_stop_in_one_line_before_anything_is_written(make_config, tmp_path,
                                                                overrides, match):
    error = DataError if "data.name" in overrides else ConfigError
    with pytest.raises(error, match=match) as raised:
        train.train_and_evaluate(make_config("fashion_mnist.py", f"{DIGITS},{overrides}"),
                                 tmp_path / "run")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_an_infinite_learning_rate_is_refused(make_config, tmp_path):
    cfg = make_config("fashion_mnist.py", DIGITS)
    cfg.optim.lr = math.inf
    with pytest.raises(ConfigError, match="optim.lr=inf must be a finite number"):
        train.train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where, match", [
    ("proc", "cannot be written"), ("file", "is a file; pass a directory"),
    ("under_file", "is a file; pass a directory"),
    ("checkpoints_file", "checkpoints is a file, not a checkpoint directory")])
def test_an_unusable_workdir_is_refused_before_anything_is_written(make_config, tmp_path,
                                                                  where, match):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    workdir = {"proc": "/proc/transferlab_run", "file": tmp_path / "a_file",
               "under_file": tmp_path / "a_file" / "run", "checkpoints_file": tmp_path / "run"}
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=match):
        train.train_and_evaluate(make_config("fashion_mnist.py", DIGITS), workdir[where])
    assert sorted(tmp_path.rglob("*")) == before


def write_idx(directory, seed):
    """Four small Fashion-MNIST-like IDX files whose pixels depend on ``seed``."""
    import struct
    directory.mkdir()
    rng = np.random.default_rng(seed)
    for (images_name, labels_name), n in zip(data.IDX_FILES.values(), (40, 10)):
        images = rng.integers(0, 256, (n, 28, 28), np.uint8)
        (directory / images_name).write_bytes(struct.pack(">HBB3I", 0, 8, 3, n, 28, 28)
                                              + images.tobytes())
        (directory / labels_name).write_bytes(struct.pack(">HBBI", 0, 8, 1, n)
                                              + (np.arange(n) % 10).astype(np.uint8).tobytes())
    return directory


def test_a_dataset_prepared_from_other_idx_files_is_not_reused(tmp_path):
    from configs.common import base_config
    cfg = base_config().data
    cfg.tfds_dir = str(tmp_path / "tfds")
    def images(seed):
        cfg.idx_dir = str(write_idx(tmp_path / f"idx{seed}", seed))
        source = data.data_source(cfg, "train")
        return sorted(source[i]["image"].tobytes() for i in range(len(source)))

    def written(seed):
        raw = (tmp_path / f"idx{seed}" / "train-images-idx3-ubyte").read_bytes()[16:]
        return sorted(raw[i:i + 784] for i in range(0, len(raw), 784))
    assert images(1) == written(1)
    assert images(2) == written(2)  # prepared anew, though a copy from idx1's files exists


def test_allowed_change_to_a_state_that_does_not_fit_is_one_line(make_config, digits_run):
    cfg = make_config("fashion_mnist.py", f"{DIGITS},optim.name='adamw',"
                      "train.allow_config_change=True")
    with pytest.raises(CheckpointError, match="is intact but does not fit this run") as error:
        train.train_and_evaluate(cfg, digits_run)
    assert "\n" not in str(error.value)


def test_a_resumed_run_sets_a_damaged_step_aside_and_can_save_it_again(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text('{"step": 7}')
    with caplog.at_level(logging.WARNING):
        _, meta, _ = checkpoints.restore(tmp_path, set_aside_damaged=True)
    assert meta == {"step": 1} and "instead of damaged step(s) [2]" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2.damaged"]
    save_steps(tmp_path, [2])
    assert checkpoints.restore(tmp_path)[1] == {"step": 2}
