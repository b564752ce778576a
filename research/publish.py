"""A finished run as a directory others can load, cite and verify; and its verification.

``publish(workdir, output)`` writes into ``output``:

- ``checkpoints/<step>/``: the weights as an orbax checkpoint (``research.checkpoints``' layout),
  which ``research.pretrained.load`` and a training config's ``init.checkpoint`` accept;
- ``model.safetensors``: the same arrays under their paths (``params/stage1/block0/conv1/kernel``,
  ``batch_stats/…``);
- ``config.json``: architecture, options, classes and input, as timm's ``pretrained_cfg``
  (mean and std on its 0–1 scale);
- ``README.md``: a model card with Hugging Face's YAML front matter;
- ``provenance.json``: the whole config, the source checkpoint's hash, the dataset and a
  fingerprint of the examples used, the metrics, the variables' hash, library versions, the
  environment, the git commit and the command that reproduces the run;
- ``train_config.py``: the run's whole config, the config file of that command;
- ``SHA256SUMS``: every other file's sha256 in ``sha256sum``'s format (``sha256sum -c`` passes).

``verify(directory, retrain=False)`` checks all of it from the directory alone and names every
difference; it never runs the directory's code unless ``retrain`` asks it to train with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import pprint
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jax
import ml_collections
import numpy as np
import safetensors.numpy
import yaml

from models.cpu import switches
from research import checkpoints, checksums, convert, data, train, tree
from research.errors import CheckpointError, DataError

SAFETENSORS, CONFIG_JSON, CARD, PROVENANCE = ("model.safetensors", "config.json", "README.md",
                                              "provenance.json")
TRAIN_CONFIG, SHA256SUMS = "train_config.py", checksums.MANIFEST
REQUIRED = (SAFETENSORS, CONFIG_JSON, CARD, PROVENANCE, TRAIN_CONFIG)
RECORDED = ("config", "source_checkpoint", "dataset", "metrics", "variables_sha256", "environment",
            "reproduce")
# Across environments (see SAME_ENVIRONMENT) float sums run in other orders: the re-evaluated
# test accuracy may differ from the recorded one by this much, the loss by this fraction.
ACCURACY_TOLERANCE = 1e-3
LOSS_TOLERANCE = 1e-3
# What must be equal for a re-evaluation to equal the recorded metrics exactly.
SAME_ENVIRONMENT = ("machine", "cpu", "backend", "device_kind", "device_count", "cpu_switches",
                    "libraries")
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-datasets",
             "grain", "safetensors")
REPRODUCE = "python -m scripts.train --config {published}/train_config.py --workdir {workdir}"
REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Report:
    """What ``verify`` found: ``held``, a line per check that passed; ``problems``, a line per
    difference (the directory verifies when there are none)."""

    held: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def check(self, ok: bool, held: str, problem: str) -> None:
        (self.held if ok else self.problems).append(held if ok else problem)


def publish(workdir: str | Path, output: str | Path) -> dict:
    """Publish the finished run in ``workdir`` into ``output`` (new or empty); returns the
    provenance. Refuses, before writing anything, an unfinished run, a run without its final
    metrics and an ``output`` that holds files."""
    workdir, output = Path(workdir), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(f"{output} already exists and is not an empty directory; choose "
                              "another --output or delete it first.")
    variables, meta, _ = checkpoints.restore(workdir)
    variables = jax.device_get(variables)  # host arrays: a checkpoint any device count restores
    step = checkpoints.latest_step(checkpoints.checkpoint_dir(workdir))
    cfg = recorded_config(meta["config"])
    exp = train.build(cfg)
    if step != exp.total_steps:
        raise CheckpointError(f"{workdir} is unfinished: its latest checkpoint is step {step} of "
                              f"{exp.total_steps}. Finish it (rerun scripts.train with the same "
                              "--workdir) before publishing.")
    metrics = _final_metrics(workdir / "metrics.jsonl", step)
    class_names = meta.get("class_names") or _class_names(exp.train_split, cfg.data)
    provenance = _provenance(cfg, meta, exp, variables, metrics, step)
    # Written beside ``output`` and renamed into place: a failed write leaves no partial output.
    staging = output.with_name(f".{output.name}.publishing")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert.write(staging, variables, dict(meta, class_names=class_names))
        flat = {path: np.asarray(value) for path, value in tree.flatten(variables).items()}
        (staging / SAFETENSORS).write_bytes(safetensors.numpy.save(
            flat, metadata={"library": "transferlab", "architecture": meta["model"]["name"]}))
        _write_json(staging / CONFIG_JSON, pretrained_cfg(meta, exp, class_names))
        _write_json(staging / PROVENANCE, provenance)
        (staging / TRAIN_CONFIG).write_text(train_config_source(provenance["config"]))
        (staging / CARD).write_text(model_card(output, provenance, class_names))
        checksums.write(staging)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return provenance


def recorded_config(config: dict) -> ml_collections.ConfigDict:
    """A run's config from its JSON record (a checkpoint's meta, provenance.json): the
    sequences JSON made lists are tuples again, as configs hold them."""
    return ml_collections.ConfigDict(_tuples(config))


def _tuples(value):
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _final_metrics(path: Path, step: int) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if not records or records[-1]["step"] != step:
        raise CheckpointError(f"{path} holds no record of the final step {step}; publish a run "
                              "trained by scripts.train, whose last evaluation it records.")
    return records[-1]


def _class_names(split: data.Split, data_cfg) -> list[str] | None:
    """The dataset's names of the split's classes, in label order, where its TFDS features
    name them (Fashion-MNIST's, digits' "0"…"9")."""
    info = getattr(split.source, "dataset_info", None)
    names = getattr(info.features[data_cfg.label_key], "names", None) if info else None
    if not names:
        return None
    classes = tuple(data_cfg.classes) or range(len(names))
    return [names[c] for c in classes]


def fingerprint(split: data.Split, chunk: int = 4096) -> str:
    """sha256 of a split's examples as training reads them (``Split.read_batch``), in order:
    their count, then each image's bytes followed by its label as a little-endian int32."""
    digest = hashlib.sha256(f"{len(split)}\0".encode())
    for start in range(0, len(split), chunk):
        images, labels = split.read_batch(np.arange(start, min(start + chunk, len(split))))
        for image, label in zip(images, labels):
            digest.update(np.ascontiguousarray(image).tobytes())
            digest.update(np.int32(label).astype("<i4").tobytes())
    return digest.hexdigest()


def _dataset(cfg, exp: train.Experiment) -> dict:
    info = getattr(exp.train_split.source, "dataset_info", None)
    splits = {}
    for role, split_name, split in (("train", cfg.data.train_split, exp.train_split),
                                    ("test", cfg.data.test_split, exp.test_split)):
        size = info.splits[split_name].num_examples if info else len(split.source)
        splits[role] = dict(split=split_name, size=size, used=len(split),
                            sha256=fingerprint(split))
    return dict(name=cfg.data.name, tfds_name=info.name if info else None,
                version=str(info.version) if info else None, classes=list(cfg.data.classes),
                per_class=cfg.data.per_class, splits=splits)


def environment() -> dict:
    """Where this process runs: what ``SAME_ENVIRONMENT`` compares, and the platform."""
    return dict(platform=platform.platform(), python=platform.python_version(),
                machine=platform.machine(), cpu=_cpu_model(), backend=jax.default_backend(),
                device_kind=jax.devices()[0].device_kind, device_count=jax.device_count(),
                process_count=jax.process_count(),
                cpu_switches={name: switches.value(name) for name in switches.SWITCHES},
                libraries={name: importlib.metadata.version(name) for name in LIBRARIES})


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), platform.processor())


def _git() -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain")))
    except (OSError, subprocess.CalledProcessError):
        return dict(commit=None, dirty=None)


def _provenance(cfg, meta, exp, variables, metrics, step) -> dict:
    source = None
    if cfg.init.checkpoint:
        source_variables, _, _ = checkpoints.restore(cfg.init.checkpoint)
        source = dict(path=cfg.init.checkpoint, variables_sha256=tree.sha256(source_variables))
    return dict(
        name=cfg.get("name", "train"), architecture=meta["model"]["name"], config=meta["config"],
        source_checkpoint=source, dataset=_dataset(cfg, exp), step=step, metrics=metrics,
        parameters=sum(int(np.size(v)) for v in tree.flatten(variables["params"]).values()),
        trainable_parameters=exp.trainable_params, variables_sha256=tree.sha256(variables),
        environment=environment(), git=_git(),
        reproduce=dict(command=REPRODUCE, where="a transferlab checkout at git.commit; "
                       "{published} is this directory, {workdir} a new directory"))


def pretrained_cfg(meta: dict, exp: train.Experiment, class_names) -> dict:
    """``config.json``: the model and its input in the spirit of timm's ``pretrained_cfg``."""
    model, spec = meta["model"], meta["preprocess"]
    size = spec["input_size"] or exp.train_split.image_shape[0]
    return dict(
        architecture=model["name"], model_options=model.get("options", {}),
        num_classes=model["num_classes"], in_chans=model["in_chans"], label_names=class_names,
        library_name="transferlab",
        pretrained_cfg=dict(
            input_size=[model["in_chans"], size, size], interpolation=spec["interpolation"],
            crop_pct=spec.get("crop_fraction", 1.0), crop_mode="center",
            mean=[m / 255 for m in spec["mean"]], std=[s / 255 for s in spec["std"]],
            channel_order=spec.get("channel_order", "RGB"), num_classes=model["num_classes"],
            classifier=exp.model.blocks[-1]))


def train_config_source(config: dict) -> str:
    """``train_config.py``: a config file that returns ``config`` as the run had it."""
    return f'''"""The whole config of the run published in this directory:

    python -m scripts.train --config THIS_DIRECTORY/train_config.py --workdir NEW_WORKDIR

from a transferlab checkout; ``:section.key=value`` overrides apply as to any config.
"""

import ml_collections

from research.config import parse_arg

CONFIG = {pprint.pformat(_tuples(config), sort_dicts=False, width=100)}


def get_config(arg=None):
    parse_arg(arg)
    return ml_collections.ConfigDict(CONFIG)
'''


def model_card(output: Path, provenance: dict, class_names) -> str:
    """``README.md``: Hugging Face's YAML front matter, then what the model is and was trained
    from, how to load it and how to reproduce it."""
    cfg, dataset, metrics = provenance["config"], provenance["dataset"], provenance["metrics"]
    source = provenance["source_checkpoint"]
    front = {"library_name": "transferlab",
             "tags": ["image-classification", "jax", "flax", "transferlab",
                      provenance["architecture"]],
             "datasets": [dataset["name"]], "metrics": ["accuracy"]}
    if source:
        front["base_model"] = source["path"]
    front["model-index"] = [{"name": output.name, "results": [{
        "task": {"type": "image-classification", "name": "Image Classification"},
        "dataset": {"name": dataset["name"], "type": dataset["name"],
                    "split": dataset["splits"]["test"]["split"]},
        "metrics": [{"type": "accuracy", "value": metrics["test_accuracy"],
                     "name": "Test accuracy"}]}]}]
    origin = (f"from `{source['path']}` (variables sha256 `{source['variables_sha256']}`)"
              if source else "from scratch")
    frozen = (f", the first {cfg['freeze']['depth']} blocks frozen"
              if cfg["freeze"]["depth"] else "")
    train_split, test_split = dataset["splits"]["train"], dataset["splits"]["test"]
    classes = ", ".join(class_names) if class_names else f"{cfg['data']['classes'] or 'all'}"
    git = provenance["git"]
    summary = (f"`{provenance['architecture']}` ({provenance['parameters']:,} parameters) "
               f"trained {origin} on {dataset['name']} (classes: {classes}) for "
               f"{cfg['train']['epochs']:g} epochs on {train_split['used']} of the "
               f"`{train_split['split']}` split's {train_split['size']} examples{frozen}. Test "
               f"accuracy {metrics['test_accuracy']:.4f} and loss {metrics['test_loss']:.4f} on "
               f"the {test_split['used']} examples of the `{test_split['split']}` split.")
    return f"""---
{yaml.safe_dump(front, sort_keys=False)}---

# {output.name}

{textwrap.fill(summary, 100)}

## Load it

```python
from research import pretrained
loaded = pretrained.load("{output}")   # .model, .variables, .meta
logits = loaded.model.apply(loaded.variables, loaded.preprocess(images_0_255), train=False)
```

As a starting point for training: `init.checkpoint={output}` in a training config. Without
transferlab: `model.safetensors` holds every array under its parameter path, `config.json`
the architecture and its input (mean and std on the 0–1 scale).

## Verify and reproduce it

```sh
sha256sum -c SHA256SUMS                        # in this directory
python -m scripts.verify {output}              # files, parameters, the test accuracy again
python -m scripts.verify {output} --retrain    # and the training run, to the same parameters
```

The run trains again with
`{REPRODUCE.format(published=output, workdir='NEW_WORKDIR')}` from a transferlab checkout at
commit `{git['commit']}`{' (with uncommitted changes)' if git['dirty'] else ''}; its whole
config is `train_config.py`, and `provenance.json` records the data's fingerprint, the
libraries and the machine. Retrained on the same platform and device count, the parameters'
sha256 is `{provenance['variables_sha256']}`.
"""


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` but SHA256SUMS, by relative path, sorted."""
    return {name: checksums.digest(directory / name) for name in checksums.files(directory)}


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def verify(directory: str | Path, retrain: bool = False) -> Report:
    """Check a published ``directory``: every file against SHA256SUMS; the checkpoint and
    model.safetensors against the recorded variables' hash, train_config.py against the
    recorded config; the model rebuilt from the directory and re-evaluated on the recorded
    test split, whose fingerprint must match, to the recorded metrics (exactly in the
    recorded environment, else within ACCURACY_TOLERANCE and LOSS_TOLERANCE); with
    ``retrain``, the recorded command run again in a temporary workdir to the same variables'
    hash."""
    directory, report = Path(directory), Report()
    _check_files(directory, report)
    try:
        provenance = json.loads((directory / PROVENANCE).read_text())
    except (OSError, ValueError) as e:
        report.problems.append(f"{PROVENANCE} cannot be read ({e}); nothing else can be checked.")
        return report
    missing = [key for key in RECORDED if key not in provenance]
    if missing:
        report.problems.append(f"{PROVENANCE} lacks {', '.join(missing)}; nothing else can be "
                               "checked.")
        return report
    report.check((directory / TRAIN_CONFIG).is_file() and (directory / TRAIN_CONFIG).read_text()
                 == train_config_source(provenance["config"]),
                 f"{TRAIN_CONFIG} holds the recorded config",
                 f"{TRAIN_CONFIG} does not hold {PROVENANCE}'s config")
    _check_safetensors(directory, provenance, report)
    _check_evaluation(directory, provenance, report)
    if retrain:
        _check_retrain(directory, provenance, report)
    return report


def _check_files(directory: Path, report: Report) -> None:
    sums = directory / SHA256SUMS
    if not sums.is_file():
        report.problems.append(f"{SHA256SUMS} is missing: the files cannot be checked.")
        return
    listed = {}
    for line in filter(str.strip, sums.read_text().splitlines()):
        digest, _, path = line.partition("  ")
        listed[path] = digest
    present, found = file_hashes(directory), len(report.problems)
    for path, digest in listed.items():
        if path not in present:
            report.problems.append(f"{path} is missing")
        elif present[path] != digest:
            report.problems.append(f"{path} is damaged: its sha256 is {present[path]}, "
                                   f"{SHA256SUMS} says {digest}")
    report.problems += [f"{path} is not in {SHA256SUMS}" for path in present if path not in listed]
    report.problems += [f"{path} is missing" for path in REQUIRED
                        if path not in listed and path not in present]
    if not any(p.startswith(checkpoints.SUBDIR + "/") for p in listed):
        report.problems.append(f"{SHA256SUMS} lists no file of the checkpoint")
    if len(report.problems) == found:
        report.held.append(f"all {len(present)} files match {SHA256SUMS}")


def _check_safetensors(directory: Path, provenance: dict, report: Report) -> None:
    try:
        flat = safetensors.numpy.load_file(directory / SAFETENSORS)
    except (OSError, safetensors.SafetensorError) as e:
        report.problems.append(f"{SAFETENSORS} cannot be read ({e})")
        return
    digest = tree.sha256(tree.unflatten(flat))
    report.check(digest == provenance["variables_sha256"],
                 f"{SAFETENSORS} holds the recorded variables",
                 f"{SAFETENSORS}'s variables have sha256 {digest}, {PROVENANCE} says "
                 f"{provenance['variables_sha256']}")


def _check_evaluation(directory: Path, provenance: dict, report: Report) -> None:
    """The model rebuilt from the directory's checkpoint and the recorded config, its
    variables hashed, its test split fingerprinted, and re-evaluated."""
    cfg = recorded_config(provenance["config"])
    cfg.init.checkpoint, cfg.init.dont_load, cfg.init.zero_head = str(directory), (), False
    try:
        exp = train.build(cfg)
    except DataError as e:
        report.problems.append(f"the recorded data cannot be read: {e}")
        return
    except Exception as e:  # noqa: BLE001  orbax raises a bare Exception on a damaged array file
        first_line = (str(e).splitlines() or [""])[0]
        report.problems.append(f"the model cannot be rebuilt from {directory} "
                               f"({type(e).__name__}: {first_line})")
        return
    digest = tree.sha256(exp.state.variables())
    report.check(digest == provenance["variables_sha256"],
                 "the checkpoint holds the recorded variables",
                 f"the checkpoint's variables have sha256 {digest}, {PROVENANCE} says "
                 f"{provenance['variables_sha256']}")
    for role, split in (("train", exp.train_split), ("test", exp.test_split)):
        recorded = provenance["dataset"]["splits"][role]["sha256"]
        report.check(fingerprint(split) == recorded, f"the {role} examples are the recorded ones",
                     f"the {role} examples differ from the recorded ones (fingerprint "
                     f"{recorded}): another version of {cfg.data.name}, or other data.* settings")
    _compare_metrics(train.evaluate(exp, exp.state), provenance, report)


def _same_environment(provenance: dict) -> list[str]:
    """The SAME_ENVIRONMENT keys in which this process differs from the recorded one."""
    here, recorded = environment(), provenance["environment"]
    return [key for key in SAME_ENVIRONMENT if here[key] != recorded.get(key)]


def _compare_metrics(metrics: dict, provenance: dict, report: Report) -> None:
    recorded, differs = provenance["metrics"], _same_environment(provenance)
    for key, tolerance, scale in (("test_accuracy", ACCURACY_TOLERANCE, 1.0),
                                  ("test_loss", LOSS_TOLERANCE, abs(recorded["test_loss"]))):
        got, want = metrics[key.removeprefix("test_")], recorded[key]
        if differs:
            ok, how = abs(got - want) <= tolerance * scale, (
                f"within {tolerance:g}{' relative' if scale != 1.0 else ''} (another "
                f"{', '.join(differs)} than recorded)")
        else:
            ok, how = got == want, "exactly (the recorded environment)"
        report.check(ok, f"{key} {got:.6g} equals the recorded {want:.6g} {how}",
                     f"{key} is {got!r}, the recorded {want!r}; it must equal it {how}")


def _check_retrain(directory: Path, provenance: dict, report: Report) -> None:
    source = provenance["source_checkpoint"]
    if source:
        try:
            digest = tree.sha256(checkpoints.restore(source["path"])[0])
        except CheckpointError as e:
            digest = f"unreadable ({e})"
        report.check(digest == source["variables_sha256"],
                     f"the source checkpoint {source['path']} is the recorded one",
                     f"the source checkpoint {source['path']} has sha256 {digest}, "
                     f"{PROVENANCE} says {source['variables_sha256']}")
    with tempfile.TemporaryDirectory(prefix="transferlab-retrain-") as tmp:
        workdir = Path(tmp) / "run"
        argv = shlex.split(provenance["reproduce"]["command"].format(
            published=shlex.quote(str(directory.resolve())), workdir=shlex.quote(str(workdir))))
        if argv[:3] != ["python", "-m", "scripts.train"]:
            report.problems.append(f"--retrain: the recorded command {' '.join(argv)!r} is not "
                                   "a scripts.train command; nothing was run.")
            return
        run = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True)
        if run.returncode:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            report.problems.append(f"--retrain: the recorded command failed (exit "
                                   f"{run.returncode}): {last}")
            return
        digest = tree.sha256(checkpoints.restore(workdir)[0])
    differs = _same_environment(provenance)
    if _git()["commit"] != provenance.get("git", {}).get("commit"):
        differs.append("git commit")
    report.check(digest == provenance["variables_sha256"],
                 "--retrain: the retrained variables equal the published ones bit for bit",
                 f"--retrain: the retrained variables have sha256 {digest}, the published "
                 f"{provenance['variables_sha256']}"
                 + (f" (retrained with another {', '.join(differs)})" if differs else ""))
