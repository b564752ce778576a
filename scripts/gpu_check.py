"""A check of transferlab on one accelerator, in one run (at most 8 minutes on one H100):

    python -m scripts.gpu_check --out runs/gpu_check          # the full check
    python -m scripts.gpu_check --tiny --out /tmp/gpu_check   # small sizes, 2 families, 2 steps
    python -m scripts.gpu_check --families resnet50 --throughput vit_b16   # a part of it

1. **Logits.** Each family's eval logits (one architecture of each, at its input size, random
   weights, batch 4) on the accelerator against XLA:CPU's, both float32 with
   ``jax.default_matmul_precision("highest")`` (no TF32 or bfloat16 passes): passes where
   ``max |accelerator - CPU| <= 1e-4 * (1 + max |CPU|)``.
2. **bfloat16 train step.** Two ``research.train`` train steps of each family with
   ``train.dtype=bfloat16`` (the first moves only a zero-initialised head): passes where the
   losses are finite and at least 90% of the parameter arrays changed.
3. **Throughput.** The bfloat16 train step of resnet50, efficientnet_b0 and vit_b16 at batch
   128 on 224² images (a device-resident batch, SGD with momentum) against PyTorch's on the
   same device (torchvision's / timm's network, bf16 autocast, channels_last,
   ``torch.compile``), in img/s and MFU: the step's flops from XLA's cost analysis of the
   compiled step (the same count for both sides; traced with XLA's own lowering,
   ``models.cpu.xla_lowering_only``, which on a GPU is the run's) over the device's peak
   dense bfloat16 flops (``PEAK_BF16``, by ``device_kind``; none for an unknown device). Beside
   them, the rate of the input pipeline (``research.data.train_batches`` on synthetic 224²
   images, generated on the host as they are read).

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` after each measurement (a run cut
short keeps what it measured); exits 1 where a check fails. On a machine without an
accelerator it compares the CPU with itself and runs PyTorch eager on the CPU
(``torch.compile`` only on CUDA): ``--tiny`` does so in the tests.

Its machine needs, beside JAX with CUDA, flax, optax, orbax-checkpoint, chex, PyTorch,
torchvision and timm: this repository, and the packages ``research/`` imports that those do
not bring (found by importing this script): ml-collections, tensorflow-datasets (with
tensorflow-metadata, promise, toml, wrapt, immutabledict, protobuf, googleapis-common-protos),
importlib-resources, grain (with cloudpickle), array-record, portpicker and flatbuffers. Without
network, carry them as wheels for its Python: on a networked machine ``pip download -d wheels
--python-version 3.12 --only-binary=:all: ml-collections==1.1.0 tensorflow-datasets==4.9.10
importlib-resources==7.1.0 grain==0.2.18 array-record==0.8.6 portpicker flatbuffers``, there
``pip install --no-index --find-links wheels ml-collections tensorflow-datasets
importlib-resources grain array-record portpicker flatbuffers``, then run the script from the
repository's root.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import cpu
from research import config, data, preprocess, sharding, train, tree
from scripts.bench import number, timed

FAMILIES = ("alexnet", "efficientnet_b0", "googlenet", "inception_v3", "lenet5",
            "mobilenet_v2", "resnet50", "vgg16_bn", "vit_b16", "xception")
PEERS = {"resnet50": ("torchvision", "resnet50"),
         "efficientnet_b0": ("torchvision", "efficientnet_b0"),
         "vit_b16": ("timm", "vit_base_patch16_224"),
         "resnet18": ("torchvision", "resnet18"), "vit_ti16": ("timm", "vit_tiny_patch16_224")}
# Peak dense bfloat16 flop/s by (a part of) jax's device_kind, from the vendors' data sheets.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12,
             "TPU v6 lite": 918e12}
RTOL = 1e-4  # of logits, relative to 1 + the largest CPU logit
SETTINGS = {"full": dict(families=FAMILIES, check_batch=4, size=None,
                         throughput=("resnet50", "efficientnet_b0", "vit_b16"), batch=128,
                         steps=20, pipeline_batches=20),
            "tiny": dict(families=("lenet5", "vit_ti16"), check_batch=2, size=32,
                         throughput=("resnet18", "vit_ti16"), batch=4, steps=2,
                         pipeline_batches=20)}
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.py"
SOURCE_SIZE = 224  # the synthetic images; each model's input is resized to its size on device


def experiment(name: str, batch: int, size: int, dtype: str) -> train.Experiment:
    """``name`` on synthetic 224² images resized to ``size``, 1000 classes, one device, SGD
    with momentum 0.9 (PyTorch's ``torch.optim.SGD(momentum=0.9)``)."""
    cfg = config.load(str(CONFIG))
    cfg.model.name, cfg.train.dtype, cfg.train.batch_size = name, dtype, batch
    cfg.data.name = f"synthetic:{SOURCE_SIZE}x{SOURCE_SIZE}x3:1000"
    cfg.data.image_size = size
    cfg.data.mean, cfg.data.std = (127.5,), (127.5,)
    cfg.optim.update(name="sgd", momentum=0.9, weight_decay=0.0, schedule="constant")
    cfg.mesh.data, cfg.train.progress = 1, False
    return train.build(cfg)


def images_and_labels(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (batch, SOURCE_SIZE, SOURCE_SIZE, 3), np.uint8),
            np.arange(batch, dtype=np.int32) % 1000)


def check_family(name: str, batch: int, size: int | None, cpu: jax.Device) -> dict:
    """Eval logits on the accelerator against the CPU's (float32), and one bfloat16 step."""
    exp = experiment(name, batch, size or models.model_info(name).input_size, "bfloat16")
    images, labels = images_and_labels(batch)
    model32 = exp.model.clone(dtype=jnp.float32)
    forward = jax.jit(lambda v, x: model32.apply(
        v, preprocess.apply(x, exp.preprocess_spec, jnp.float32), train=False))
    with jax.default_matmul_precision("highest"):
        on_device = np.asarray(forward(exp.state.variables(), images))
        on_cpu = np.asarray(forward(jax.device_put(jax.device_get(exp.state.variables()), cpu),
                                    jax.device_put(images, cpu)))
    error = float(np.max(np.abs(on_device - on_cpu)))
    bound = RTOL * (1 + float(np.max(np.abs(on_cpu))))
    before = [np.asarray(v) for v in tree.flatten(jax.device_get(exp.state.params)).values()]
    step, state, losses = train.make_train_step(exp), exp.state, []
    for _ in range(2):
        state, metrics = step(state, *sharding.global_batch(exp.mesh, images, labels))
        losses.append(float(metrics["loss"]))
    after = tree.flatten(jax.device_get(state.params)).values()
    changed = float(np.mean([not np.array_equal(a, b)
                             for a, b in zip(before, after, strict=True)]))
    return dict(model=name, logits_max_error=error, logits_bound=bound,
                logits_pass=bool(error <= bound), bf16_loss=losses[-1],
                bf16_params_changed=changed,
                bf16_pass=bool(all(map(math.isfinite, losses)) and changed >= 0.9))


def ours_throughput(name: str, batch: int, size: int, steps: int, peak: float | None) -> dict:
    exp = experiment(name, batch, size, "bfloat16")
    images, labels = images_and_labels(batch)
    x, y = sharding.global_batch(exp.mesh, images, labels)
    start = time.perf_counter()
    with cpu.xla_lowering_only():
        compiled = train.make_train_step(exp).lower(exp.state, x, y).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.cost_analysis()
    flops = float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])
    state = [exp.state]

    def step():
        state[0], metrics = compiled(state[0], x, y)
        jax.block_until_ready(metrics)
    seconds = timed(step, steps)
    return dict(img_s=batch / seconds, flops=flops, compile_s=compile_s,
                mfu=flops / seconds / peak if peak else None)


def torch_throughput(name: str, batch: int, size: int, steps: int, flops: float,
                     peak: float | None) -> dict:
    """PyTorch's train step of the same network: bf16 autocast, channels_last, and
    ``torch.compile`` on CUDA (eager elsewhere)."""
    import torch
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    library, peer = PEERS[name]
    if library == "timm":
        import timm
        net = timm.create_model(peer, pretrained=False, img_size=size)
    else:
        import torchvision
        net = getattr(torchvision.models, peer)(weights=None)
    net = net.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(net) if cuda else net
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.arange(batch, device=device) % 1000

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
    start = time.perf_counter()
    step()  # compiles
    compile_s = time.perf_counter() - start
    seconds = timed(step, steps)
    return dict(img_s=batch / seconds, compile_s=compile_s, compiled=cuda,
                mfu=flops / seconds / peak if peak else None)


def pipeline_rate(batch: int, batches: int) -> float:
    """Images a second of ``research.data.train_batches`` on synthetic 224² images, over
    ``batches`` batches after its prefetch buffer has filled once."""
    data_cfg = config.load(str(CONFIG)).data
    data_cfg.name = f"synthetic:{SOURCE_SIZE}x{SOURCE_SIZE}x3:1000"
    split, _ = data.load_splits(data_cfg, seed=0)
    iterator = data.train_batches(split, batch, seed=0)
    for _ in range(5):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batch * batches / (time.perf_counter() - start)


def peak_bf16(kind: str) -> float | None:
    """The first entry of PEAK_BF16 that ``kind`` contains (the longer names first)."""
    for part in sorted(PEAK_BF16, key=len, reverse=True):
        if part in kind:
            return PEAK_BF16[part]
    return None


def run(setting: dict, save) -> dict:
    """The checks and measurements of ``setting``; ``save(result, what)`` after each."""
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    peak = peak_bf16(device.device_kind)
    size, batch, steps = setting["size"] or 224, setting["batch"], setting["steps"]
    result = dict(environment=dict(device=device.device_kind, platform=device.platform,
                                   jax=jax.__version__, peak_bf16_flops=peak,
                                   python=sys.version.split()[0]),
                  tolerance=f"{RTOL} * (1 + max |CPU|)",
                  pipeline_img_s=pipeline_rate(batch, setting["pipeline_batches"]),
                  checks=[], throughput=[])
    save(result, "input pipeline")
    for name in setting["families"]:
        result["checks"].append(check_family(name, setting["check_batch"], setting["size"], cpu))
        save(result, f"{name}: logits and bfloat16 steps")
    for name in setting["throughput"]:
        ours = ours_throughput(name, batch, size, steps, peak)
        peer = torch_throughput(name, batch, size, steps, ours["flops"], peak)
        result["throughput"].append(dict(model=name, batch=batch, size=size, ours=ours,
                                         torch=peer, ratio=ours["img_s"] / peer["img_s"]))
        save(result, f"{name}: throughput")
    return result


def markdown(result: dict) -> str:
    env = result["environment"]
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"
    lines = [f"# GPU check: {env['device']} ({env['platform']}), JAX {env['jax']}", "",
             f"Eval logits in float32 (matmul precision highest) against XLA:CPU's: pass where "
             f"max |error| <= {result['tolerance']}. Two bfloat16 train steps: pass where the "
             "losses are finite and >= 90% of parameter arrays changed.", "",
             "| model | logits max error | bound | logits | bf16 loss | params changed "
             "| bf16 steps |",
             "|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['model']} | {c['logits_max_error']:.2e} | {c['logits_bound']:.2e} | "
                     f"{'pass' if c['logits_pass'] else 'FAIL'} | {number(c['bf16_loss'])} | "
                     f"{c['bf16_params_changed']:.0%} | {'pass' if c['bf16_pass'] else 'FAIL'} |")
    lines += ["", f"Train step, bfloat16, img/s and MFU (peak {number(env['peak_bf16_flops'])} "
              "flop/s); input pipeline (synthetic 224², host): "
              f"{result['pipeline_img_s']:.0f} img/s.", "",
              "| model | batch | ours img/s | ours MFU | PyTorch img/s | PyTorch MFU | ratio | "
              "GFLOP/step | compile s (ours / PyTorch) |", "|---|---|---|---|---|---|---|---|---|"]
    for t in result["throughput"]:
        o, p = t["ours"], t["torch"]
        lines.append(f"| {t['model']} | {t['batch']} | {o['img_s']:.1f} | {pct(o['mfu'])} | "
                     f"{p['img_s']:.1f}{'' if p['compiled'] else ' (eager)'} | {pct(p['mfu'])} | "
                     f"{t['ratio']:.2f} | {o['flops'] / 1e9:.1f} | "
                     f"{o['compile_s']:.0f} / {p['compile_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="checks of lenet5 and vit_ti16, throughput of resnet18 and "
                             "vit_ti16, 32² inputs, batch 4, 2 steps")
    parser.add_argument("--families", help="comma-separated models to check (default: "
                        "one of each family)")
    parser.add_argument("--throughput", help="comma-separated models to time against PyTorch, "
                        f"of {','.join(PEERS)}")
    parser.add_argument("--out", default="runs/gpu_check")
    args = parser.parse_args()
    setting = dict(SETTINGS["tiny" if args.tiny else "full"])
    for key in ("families", "throughput"):
        if getattr(args, key):
            setting[key] = tuple(getattr(args, key).split(","))
    check_models(setting)
    out, start = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    def save(result, what):
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "gpu_check.md").write_text(markdown(result))
        print(f"[{time.perf_counter() - start:.0f} s] {what}", flush=True)
    result = run(setting, save)
    print(markdown(result))
    passed = all(c["logits_pass"] and c["bf16_pass"] for c in result["checks"])
    sys.exit(0 if passed else 1)


def check_models(setting: dict) -> None:
    """Stop before measuring anything at an unknown model or one without a PyTorch peer."""
    unknown = [n for n in setting["families"] if n not in models.list_models()]
    unpaired = [n for n in setting["throughput"] if n not in PEERS]
    if unknown or unpaired:
        raise SystemExit(f"--families: unknown {unknown} (see models.list_models()); "
                         f"--throughput: no PyTorch peer for {unpaired} (of {', '.join(PEERS)})")


if __name__ == "__main__":
    main()
