"""Publishing a run (research.publish): the directory loads as pretrained weights and as
init.checkpoint, its files agree with each other and with the run, and verify names every
damage."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import yaml

from research import ablate, checkpoints, checksums, config, data, pretrained, publish, train, tree
from research.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
# A small ResNet with BatchNorm, 6 steps on 200 digits; checkpoints at steps 3 and 6.
RUN = ("data.name='digits',data.mean=(32.0,),data.std=(48.0,),data.per_class=20,"
       "train.batch_size=32,train.epochs=1.0,train.checkpoint_every_epochs=0.5,"
       "train.progress=False")


def run_config(tfds_dir, overrides=""):
    spec = f"{ROOT / 'configs/fashion_mnist.py'}:data.tfds_dir={tfds_dir},{RUN}"
    return config.load(spec + ("," + overrides if overrides else ""))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tfds_dir):
    workdir = tmp_path_factory.mktemp("publish") / "run"
    cfg = run_config(tfds_dir)
    result = train.train_and_evaluate(cfg, workdir)
    return workdir, cfg, result


@pytest.fixture(scope="module")
def published(run):
    workdir, _, _ = run
    output = workdir.parent / "published"
    return output, publish.publish(workdir, output)


@pytest.fixture
def copy(published, tmp_path):
    """A copy of the published directory to damage."""
    return Path(shutil.copytree(published[0], tmp_path / "copy"))


def test_tree_sha256_is_of_paths_dtypes_shapes_and_bytes():
    a = {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    same = {"params": {"dense": {"kernel": np.arange(6, dtype=">f4").reshape(2, 3)}}}
    assert tree.sha256(a) == tree.sha256(same) == tree.sha256(tree.unflatten(tree.flatten(a)))
    for other in ({"params": {"dense": {"bias": a["params"]["dense"]["kernel"]}}},
                  {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32)}}},
                  {"params": {"dense": {"kernel": np.arange(6, dtype=np.int32).reshape(2, 3)}}},
                  {"params": {"dense": {"kernel": np.arange(1, 7, dtype=np.float32).reshape(2, 3)}}}):
        assert tree.sha256(other) != tree.sha256(a)


def test_loads_back_through_pretrained_and_init_checkpoint(run, published, tfds_dir):
    workdir, _, result = run
    output, provenance = published
    trained = tree.sha256(result["state"].variables())
    assert provenance["variables_sha256"] == trained
    loaded = pretrained.load(output)
    assert tree.sha256(loaded.variables) == trained
    assert loaded.meta["class_names"] == [str(d) for d in range(10)]
    # As a training config's starting point: every path loaded, the head included.
    exp = train.build(run_config(tfds_dir, f"init.checkpoint={output},init.dont_load=()"))
    assert tree.sha256(exp.state.variables()) == trained


def test_safetensors_holds_the_checkpoints_arrays_under_their_paths(run, published):
    output, _ = published
    flat = safetensors.numpy.load_file(output / publish.SAFETENSORS)
    expected = tree.flatten(pretrained.load(output).variables)
    assert "params/stage1/block0/conv1/kernel" in flat
    assert any(key.startswith("batch_stats/") for key in flat)
    assert flat.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(flat[key], np.asarray(value), err_msg=key)


def test_sha256sum_checks_every_file(published):
    output, _ = published
    listed = (output / publish.SHA256SUMS).read_text().splitlines()
    files = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    assert {line.split("  ", 1)[1] for line in listed} == files - {publish.SHA256SUMS}
    subprocess.run(["sha256sum", "--quiet", "-c", publish.SHA256SUMS], cwd=output, check=True)


def test_provenance_config_card_and_train_config_describe_the_run(run, published, tfds_dir):
    workdir, cfg, result = run
    output, provenance = published
    assert json.loads((output / publish.PROVENANCE).read_text()) == provenance
    assert config.load(str(output / publish.TRAIN_CONFIG)).to_dict() == cfg.to_dict()
    records = (workdir / "metrics.jsonl").read_text().splitlines()
    assert provenance["metrics"] == json.loads(records[-1])
    assert provenance["metrics"]["test_accuracy"] == result["test_accuracy"]
    train_split, test_split = data.load_splits(cfg.data, seed=cfg.train.seed)
    splits = provenance["dataset"]["splits"]
    assert splits["train"]["sha256"] == publish.fingerprint(train_split)
    assert splits["test"]["sha256"] == publish.fingerprint(test_split)
    assert (splits["train"]["used"], splits["train"]["size"]) == (200, 1437)
    assert provenance["parameters"] == sum(np.size(v) for v in tree.flatten(
        result["state"].params).values())
    assert provenance["source_checkpoint"] is None
    assert provenance["environment"]["device_count"] == 8
    assert provenance["git"]["commit"]

    pretrained_cfg = json.loads((output / publish.CONFIG_JSON).read_text())
    assert pretrained_cfg["architecture"] == "resnet_small"
    assert pretrained_cfg["label_names"] == [str(d) for d in range(10)]
    assert pretrained_cfg["pretrained_cfg"]["input_size"] == [1, 8, 8]
    assert pretrained_cfg["pretrained_cfg"]["mean"] == [32.0 / 255]

    card = (output / publish.CARD).read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transferlab" and "base_model" not in front
    [result_entry] = front["model-index"][0]["results"]
    assert result_entry["metrics"][0]["value"] == result["test_accuracy"]
    assert f"--config {output}/train_config.py" in card


def test_a_transfer_records_its_source_checkpoint(published, tfds_dir, tmp_path):
    """A run from the published weights names them as base_model with their hash."""
    source, provenance = published
    workdir = tmp_path / "transfer"
    train.train_and_evaluate(run_config(tfds_dir, f"init.checkpoint={source},"
                                                  "data.classes=(0,1,2),freeze.depth=2"), workdir)
    transfer = publish.publish(workdir, tmp_path / "out")
    assert transfer["source_checkpoint"] == dict(path=str(source),
                                                 variables_sha256=provenance["variables_sha256"])
    assert json.loads((tmp_path / "out" / publish.CONFIG_JSON).read_text())["label_names"] == [
        "0", "1", "2"]
    front = yaml.safe_load((tmp_path / "out" / publish.CARD).read_text().split("---\n")[1])
    assert front["base_model"] == str(source)


def test_verify_passes_on_the_published_directory(published):
    report = publish.verify(published[0])
    assert report.problems == []
    assert any("test_accuracy" in line and "exactly" in line for line in report.held)


def test_verify_names_a_damaged_array_file(copy):
    array_file = max((p for p in (copy / checkpoints.SUBDIR).rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
    raw = bytearray(array_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    array_file.write_bytes(bytes(raw))
    problems = publish.verify(copy).problems
    assert f"{array_file.relative_to(copy).as_posix()} is damaged" in problems[0]
    # Orbax loads the flipped bytes as other weights, or fails: either way verify names it.
    assert any(p.startswith(("the checkpoint's variables have sha256",
                             "the model cannot be rebuilt")) for p in problems[1:]), problems


def test_verify_names_a_missing_file(copy):
    (copy / publish.SAFETENSORS).unlink()
    problems = publish.verify(copy).problems
    assert problems[0] == f"{publish.SAFETENSORS} is missing"
    assert any(f"{publish.SAFETENSORS} cannot be read" in p for p in problems)


def edit_provenance(directory, edit):
    """Change provenance.json and SHA256SUMS with it, as a consistent forgery would."""
    provenance = json.loads((directory / publish.PROVENANCE).read_text())
    edit(provenance)
    (directory / publish.PROVENANCE).write_text(json.dumps(provenance))
    checksums.write(directory)


def test_verify_names_a_changed_metric(copy):
    edit_provenance(copy, lambda p: p["metrics"].update(
        test_accuracy=p["metrics"]["test_accuracy"] + publish.ACCURACY_TOLERANCE / 2))
    [problem] = publish.verify(copy).problems
    assert problem.startswith("test_accuracy is ") and "exactly" in problem


def test_verify_allows_the_stated_tolerance_in_another_environment(copy):
    def elsewhere(provenance):
        provenance["environment"]["device_count"] = 4
        provenance["metrics"]["test_accuracy"] += publish.ACCURACY_TOLERANCE / 2
    edit_provenance(copy, elsewhere)
    report = publish.verify(copy)
    assert report.problems == []
    assert any(line.startswith("test_accuracy") and "within 0.001 (another device_count" in line
               for line in report.held)
    edit_provenance(copy, lambda p: p["metrics"].update(
        test_accuracy=p["metrics"]["test_accuracy"] + 2 * publish.ACCURACY_TOLERANCE))
    [problem] = publish.verify(copy).problems
    assert problem.startswith("test_accuracy is ")


def test_verify_cli_exits_1_naming_each_difference(copy):
    (copy / publish.CARD).write_text("edited")
    (copy / "extra.txt").write_text("unlisted")
    out = subprocess.run([sys.executable, "-m", "scripts.verify", str(copy)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"differs: {publish.CARD} is damaged: its sha256 is "
        f"{publish.file_hashes(copy)[publish.CARD]}, SHA256SUMS says "
        f"{_listed(copy)[publish.CARD]}",
        "differs: extra.txt is not in SHA256SUMS"]


def _listed(directory):
    lines = (directory / publish.SHA256SUMS).read_text().splitlines()
    return {path: digest for digest, path in (line.split("  ", 1) for line in lines)}


def test_publish_refuses_an_unfinished_run_and_a_used_output(run, published, tmp_path):
    workdir, _, _ = run
    unfinished = Path(shutil.copytree(workdir, tmp_path / "unfinished"))
    shutil.rmtree(unfinished / checkpoints.SUBDIR / "6")
    with pytest.raises(CheckpointError, match="unfinished: its latest checkpoint is step 3 of 6"):
        publish.publish(unfinished, tmp_path / "out")
    with pytest.raises(CheckpointError, match="already exists"):
        publish.publish(workdir, published[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_verify_retrain_reproduces_the_parameter_hash(published):
    report = publish.verify(published[0], retrain=True)
    assert report.problems == []
    assert "--retrain: the retrained variables equal the published ones bit for bit" in report.held


def test_quickstart_pretrain_config_is_the_quickstarts_pretrain_section():
    """``make demo`` pretrains with configs/quickstart_pretrain.py, then transfers with
    configs/quickstart.py: both must be the same run."""
    for arg in ("", ":reduced=True"):
        alone = config.load(f"{ROOT / 'configs/quickstart_pretrain.py'}{arg}")
        assert alone.to_dict() == config.load(f"{ROOT / 'configs/quickstart.py'}{arg}").pretrain.to_dict()


@pytest.mark.slow
def test_an_ablation_transfers_from_a_published_directory(published, tfds_dir, tmp_path):
    """The demo's last step: ``pretrain.init.checkpoint=<published>`` trains nothing before
    transferring, and every transfer run starts from the published weights."""
    output, _ = published
    transfer = ",".join(f"transfer.{o}" for o in (
        "data.name='digits'", "data.mean=(32.0,)", "data.std=(48.0,)", f"data.tfds_dir={tfds_dir}",
        "data.classes=(0,1,2,3,4)", "data.per_class=10", "train.epochs=1.0", "train.batch_size=16"))
    cfg = config.load(f"{ROOT / 'configs/quickstart.py'}:reduced=True,depths=(1,),"
                      f"regimes=('finetune',),pretrain.init.checkpoint={output},{transfer}")
    [row] = ablate.run_sweep(cfg, tmp_path)
    assert not (tmp_path / "pretrain").exists()
    _, meta, _ = checkpoints.restore(tmp_path / "runs" / "finetune_depth1_seed0")
    assert meta["config"]["init"]["checkpoint"] == str(output)
    assert row["freeze_depth"] == 1


def test_publish_cli_refuses_a_used_output_in_one_line(run, published):
    workdir, _, _ = run
    out = subprocess.run([sys.executable, "-m", "scripts.publish", "--workdir", str(workdir),
                          "--output", str(published[0])], cwd=ROOT, capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.splitlines() == [f"error: {published[0]} already exists and is not an empty "
                                       "directory; choose another --output or delete it first."]


def test_a_failed_publish_leaves_no_output(run, tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(publish, "model_card", full_disk)
    (tmp_path / "out").mkdir()  # an empty output directory is taken
    with pytest.raises(OSError, match="No space left"):
        publish.publish(run[0], tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not any((tmp_path / "out").iterdir())
