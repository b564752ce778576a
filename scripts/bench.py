"""Side-by-side speed of transferlab and PyTorch eager on this machine, in one run:

    python -m scripts.bench                      # the five models, batch 16, 224², fp32
    python -m scripts.bench --quick              # a short run (small images, few steps)
    python -m scripts.bench --small --rounds 3   # the protocols' scale: 32², batch 128
    python -m scripts.bench --models resnet18 --steps 20 --out runs/bench
    python -m scripts.bench --pipeline           # decoding and augmenting 224² JPEGs only

Every measurement runs in its own subprocess, so that its peak memory (max RSS) and thread
settings are its own, and the measurements run one at a time. Where two sides are compared
(PyTorch, ours) their processes take turns, a few steps each after a quarter second of untimed
ones, until each has its steps, so that the machine's drift over minutes moves both sides alike
instead of the ratio. They set up in that order, ours last (the first of two identical
processes set up measures a little faster). The benchmark opts in to the process settings for
both sides alike (``models.cpu.process.restart_tuned``: glibc's huge pages and the buffer
cache); PyTorch without them runs after each pair, alone, since a process without them slows
its neighbours. The freeze sweep likewise runs each depth (and its cached prefix) in turns with full
fine-tuning, set up first, and divides by that full step for its ``speedup``.
Writes ``bench.json`` (one record per measurement: ``model``, ``what``, ``ours``, ``peer``,
``ratio``, …) and ``bench.md``.
"""

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models.cpu import native, process

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vit_s16")
SMALL_MODELS = ("resnet_small", "resnet18", "lenet5")  # --small: the protocols' scale
PEERS = {"resnet18": ("torchvision", "resnet18"), "resnet50": ("torchvision", "resnet50"),
         "mobilenet_v2": ("torchvision", "mobilenet_v2"),
         "efficientnet_b0": ("torchvision", "efficientnet_b0"),
         "vit_s16": ("timm", "vit_small_patch16_224"),
         "resnet_small": ("here", "torch_resnet_small"), "lenet5": ("here", "torch_lenet5")}
TORCH_THREADS = 2
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.py"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


TURN_STEPS = "TRANSFERLAB_BENCH_TURN_STEPS"  # set by ``measure_interleaved`` for its processes
TURN_WARMUP_S = 0.25  # untimed calls at the start of each turn, at least one


def timed(fn, steps: int, warmup: int = 2) -> float:
    """Seconds per call of ``fn`` (which blocks until its result is ready): the median call,
    which a neighbour's burst on a shared machine moves less than the mean. Under
    ``measure_interleaved`` the calls run in turns of TURN_STEPS, each after untimed calls for
    TURN_WARMUP_S (a step of a few milliseconds would otherwise time threads waking up)."""
    turn = int(os.environ.get(TURN_STEPS, "0"))
    seconds = []
    while len(seconds) < steps:
        if turn:
            wait_for_turn()
        warm_up(fn, 1 if seconds else warmup, TURN_WARMUP_S if turn else 0.0)
        for _ in range(min(turn or steps, steps - len(seconds))):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def warm_up(fn, calls: int, seconds: float) -> None:
    """``calls`` untimed calls of ``fn``, and more until ``seconds`` have passed."""
    start = time.perf_counter()
    for done in itertools.count():
        if done >= calls and time.perf_counter() - start >= seconds:
            return
        fn()


def wait_for_turn() -> None:
    print("turn", flush=True)
    sys.stdin.readline()


MATMUL = 1024  # the side of the square float32 products that measure the machine's peak


def ours_matmul(steps: int) -> dict:
    import jax
    a = jax.random.normal(jax.random.key(0), (MATMUL, MATMUL))
    product = jax.jit(lambda a: a @ a)
    return dict(gflop_s=2 * MATMUL ** 3 / timed(lambda: product(a).block_until_ready(), steps)
                / 1e9)


def peer_matmul(steps: int) -> dict:
    import torch
    torch.set_num_threads(TORCH_THREADS)
    a = torch.randn(MATMUL, MATMUL)
    return dict(gflop_s=2 * MATMUL ** 3 / timed(lambda: a @ a, steps) / 1e9)


# --- ours --------------------------------------------------------------------------------

def experiment(model: str, batch: int, size: int, freeze_depth: int = 0):
    from research import config, train
    cfg = config.load(str(CONFIG))
    cfg.model.name = model
    cfg.data.name = f"synthetic:{size}x{size}x3:1000"
    cfg.data.mean, cfg.data.std = (127.5,), (127.5,)
    cfg.train.batch_size = batch
    cfg.freeze.depth = freeze_depth
    cfg.optim.update(name="sgd", momentum=0.9, weight_decay=0.0, grad_clip=0.0,
                     schedule="constant")  # the peer's torch.optim.SGD(momentum=0.9)
    cfg.mesh.data = 1
    cfg.train.progress = False
    return train.build(cfg)


def ours_train(model: str, batch: int, size: int, steps: int, freeze_depth: int = 0,
               cache_prefix: bool = False) -> dict:
    """The train step; with ``cache_prefix``, the step on cached outputs of the frozen prefix
    (``freeze.cache_prefix``), and the one-time cost of computing them (``prefix_s_per_image``)."""
    import jax
    import numpy as np
    from research import prefix_cache, sharding, train
    exp = experiment(model, batch, size, freeze_depth)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
    labels = np.arange(batch, dtype=np.int32) % 1000
    x, y = sharding.global_batch(exp.mesh, images, labels)
    cache, extra = None, {}
    if cache_prefix:
        cache = prefix_cache.empty(exp)
        variables = exp.state.variables()
        prefix_s = timed(lambda: jax.block_until_ready(cache.prefix(variables, x)), steps)
        x = cache.prefix(variables, x)
        extra = dict(prefix_s_per_image=prefix_s / batch, cached_shape=list(x.shape[1:]))
    start = time.perf_counter()
    compiled = train.make_train_step(exp, cache).lower(exp.state, x, y).compile()
    compile_s = time.perf_counter() - start
    flops = train.compiled_flops(exp, cache, jax.ShapeDtypeStruct(x.shape, x.dtype))
    state = [exp.state]

    def step():
        state[0], metrics = compiled(state[0], x, y)
        jax.block_until_ready(metrics)
    seconds = timed(step, steps)
    return dict(img_s=batch / seconds, compile_s=compile_s, flops=float(flops), peak_mb=peak_mb(),
                trainable_params=exp.trainable_params, **extra)


def ours_inference(model: str, batch: int, size: int, steps: int) -> dict:
    import jax
    import numpy as np
    import models
    net = models.create(model, num_classes=1000)
    variables = models.init_variables(net, jax.random.key(0), size)
    x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)),
                          jax.numpy.float32)
    forward = jax.jit(lambda v, x: net.apply(v, x, train=False))
    start = time.perf_counter()
    compiled = forward.lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    seconds = timed(lambda: jax.block_until_ready(compiled(variables, x)), steps)
    return dict(img_s=batch / seconds, compile_s=compile_s, peak_mb=peak_mb())


def experiment_blocks(model: str):
    import models
    return models.create(model, num_classes=1000).blocks


def ours_pipeline(dataset: str, batch: int, steps: int) -> dict:
    from research import config, data
    cfg = config.load(str(CONFIG)).data
    cfg.name = dataset
    split, _ = data.load_splits(cfg, seed=0)
    batches = data.train_batches(split, batch, seed=0)
    seconds = timed(lambda: next(batches), steps, warmup=5)
    return dict(img_s=batch / seconds, peak_mb=peak_mb())


JPEG_WORKERS = (0, 1, 2)  # the --pipeline mode's data.workers


def ours_jpeg_pipeline(workers: int, batch: int, steps: int, size: int = 224) -> dict:
    """Training batches from a folder of ``size``² JPEGs: decoded, inception-cropped, flipped
    and batched in ``workers`` grain processes (``configs/finetune.py``'s augmentation)."""
    import numpy as np
    from PIL import Image

    from research import config, data
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="transferlab-bench-jpegs-") as folder:
        for k in range(2 * batch):  # smooth random photographs, compressed as cameras do
            image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8))
            (Path(folder) / str(k % 2)).mkdir(exist_ok=True)
            image.resize((size, size), Image.Resampling.BICUBIC).save(
                Path(folder) / str(k % 2) / f"{k}.jpg", quality=90)
        cfg = config.load(f"{Path(__file__).parents[1] / 'configs' / 'finetune.py'}:"
                          f"checkpoint=none,folder={folder},data.workers={workers},"
                          f"data.image_size={size},data.test_fraction=0.5")
        split, _ = data.fit_pipeline(cfg, {}, *data.load_splits(cfg.data, seed=0))
        batches = data.train_batches(split, batch, seed=0)
        for _ in range(3):  # the workers started and their buffers filled
            next(batches)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):  # the whole run: workers deliver in bursts, which a median
            next(batches)  # call (``timed``) would count as their rate
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    # Per CPU-second of this process, whose threads do all the work without workers: the
    # rate of one core, whatever a shared machine's neighbours take.
    per_core = batch * steps / cpu if workers == 0 else None
    return dict(img_s=batch * steps / seconds, img_s_per_core=per_core, peak_mb=peak_mb())


def pipeline_run(batch: int, steps: int, records: list[dict], log=print) -> None:
    """``--pipeline``: img/s of ``ours_jpeg_pipeline`` with each of ``JPEG_WORKERS``, and
    (without workers) per core."""
    for workers in JPEG_WORKERS:
        result = measure("ours_jpeg_pipeline", workers=workers, batch=batch, steps=steps * 5)
        per_core = result["img_s_per_core"]
        records.append(dict(model="jpeg 224²", what=f"input pipeline, {workers} workers",
                            ours=result["img_s"], peer=None, unit="img/s", ratio=None,
                            **({"img_s_per_core": per_core} if per_core else {})))
        log(f"jpeg 224² pipeline, {workers} workers: {result['img_s']:.1f} img/s"
            + (f" ({per_core:.1f} per core)" if per_core else ""))


# --- PyTorch eager -------------------------------------------------------------------------

def torch_resnet_small():
    """``models.resnet.ResNetSmall`` for 1000 classes in PyTorch, from torchvision's blocks."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock, conv1x1

    def block(inplanes, planes, stride):
        downsample = None if stride == 1 and inplanes == planes else nn.Sequential(
            conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        return BasicBlock(inplanes, planes, stride, downsample)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(inplace=True), block(16, 16, 1), block(16, 32, 2),
                         block(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 1000))


def torch_lenet5():
    """``models.lenet.LeNet5`` for 3 channels (32² inputs) and 1000 classes in PyTorch."""
    from torch import nn
    return nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5),
                         nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(16, 120, 5), nn.ReLU(),
                         nn.Flatten(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 1000))


OWN_PEERS = {"torch_resnet_small": torch_resnet_small, "torch_lenet5": torch_lenet5}


def torch_model(model: str):
    import torch
    torch.set_num_threads(TORCH_THREADS)
    library, name = PEERS[model]
    if library == "timm":
        import timm
        net = timm.create_model(name, pretrained=False)
    elif library == "here":
        net = OWN_PEERS[name]()
    else:
        import torchvision
        net = getattr(torchvision.models, name)(weights=None)
    return net.to(memory_format=torch.channels_last)


def peer_train(model: str, batch: int, size: int, steps: int) -> dict:
    import torch
    net = torch_model(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    y = torch.arange(batch) % 1000

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    seconds = timed(step, steps)
    return dict(img_s=batch / seconds, peak_mb=peak_mb())


def peer_inference(model: str, batch: int, size: int, steps: int) -> dict:
    import torch
    net = torch_model(model).eval()
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        seconds = timed(lambda: net(x), steps)
    return dict(img_s=batch / seconds, peak_mb=peak_mb())


MEASURES = {"ours_train": ours_train, "ours_inference": ours_inference,
            "ours_pipeline": ours_pipeline, "ours_jpeg_pipeline": ours_jpeg_pipeline,
            "ours_matmul": ours_matmul, "peer_train": peer_train,
            "peer_inference": peer_inference, "peer_matmul": peer_matmul}


# --- driver ------------------------------------------------------------------------------

def measure(name: str, glibc_defaults: bool = False, **kwargs) -> dict:
    """Run one measurement in a fresh subprocess and return its result; ``glibc_defaults``
    runs it without the process settings (``process.untuned_environment``)."""
    return measure_interleaved([(name, glibc_defaults, kwargs)], turn_steps=0)[0]


def measure_interleaved(specs, turn_steps: int = 2) -> list[dict]:
    """Run measurements ``(name, glibc_defaults, kwargs)`` in subprocesses that take turns: each
    sets up alone, then times ``turn_steps`` steps at a time while the others wait (with
    ``turn_steps=0``, all its steps at once). Returns their results, in order."""
    children, results = [], []
    for name, glibc_defaults, kwargs in specs:  # one at a time: set-up runs alone
        children.append(_start(name, glibc_defaults, kwargs, turn_steps))
        results.append(_until_turn_or_end(children[-1]))
    while any(r == "turn" for r in results):
        for i, child in enumerate(children):
            if results[i] == "turn":
                child.stdin.write("go\n")
                child.stdin.flush()
                results[i] = _until_turn_or_end(child)
    return results


def _start(name: str, glibc_defaults: bool, kwargs: dict, turn_steps: int):
    env = {**os.environ, TURN_STEPS: str(turn_steps)}
    if glibc_defaults:
        env = process.untuned_environment(env)
    child = subprocess.Popen(
        [sys.executable, "-m", "scripts.bench", "--one", json.dumps({"name": name, **kwargs})],
        cwd=Path(__file__).parents[1], env=env, text=True, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=tempfile.TemporaryFile("w+"))
    child.spec = f"{name}{kwargs}"
    return child


def _until_turn_or_end(child):
    """"turn" when the child waits for its next turn, else its result once it has ended."""
    last = ""
    for line in child.stdout:
        if line.strip() == "turn":
            return "turn"
        last = line.strip() or last
    if child.wait():
        child.stderr.seek(0)
        raise RuntimeError(f"{child.spec} failed:\n{child.stderr.read()[-3000:]}")
    return json.loads(last)


def compared_rounds(kind: str, shape: dict, rounds: int) -> list[tuple[dict, dict, dict]]:
    """``rounds`` times, fresh processes of PyTorch and ours taking turns, then PyTorch with
    glibc's defaults alone: their results, a (peer, as_shipped, ours) triple per round."""
    results = []
    for _ in range(rounds):
        peer, ours = measure_interleaved([(f"peer_{kind}", False, shape),
                                          (f"ours_{kind}", False, shape)])
        results.append((peer, measure(f"peer_{kind}", glibc_defaults=True, **shape), ours))
    return results


def median_of(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def run(models, batch: int, size: int, steps: int, freeze_model: str | None, rounds: int,
        records: list[dict], log=print) -> None:
    """Measure, appending to ``records`` as it goes (so that a failure keeps what was measured).
    With ``rounds`` > 1 the compared sides run that many times in fresh processes: their img/s
    are the rounds' medians, the ratio the median of the rounds' ratios, ``round_ratios`` each
    round's. Without ``freeze_model`` the freeze sweep is left out."""

    def record(model, what, ours, peer=None, unit="img/s", ratio=None, **extra):
        rec = dict(model=model, what=what, ours=ours, peer=peer, unit=unit,
                   ratio=ratio or (ours / peer if peer else None), **extra)
        records.append(rec)
        log(f"{model:>16} {what:<28} ours {ours:10.2f} {unit}"
            + (f"  peer {peer:10.2f}  ratio {rec['ratio']:.2f}" if peer else ""))

    peer_peak, ours_peak = [r["gflop_s"] for r in measure_interleaved(
        [(f"{who}_matmul", False, dict(steps=10 * steps)) for who in ("peer", "ours")],
        turn_steps=2 * steps)]
    peak = (ours_peak, peer_peak)
    record("machine", f"float32 matmul {MATMUL}³", *peak, unit="GFLOP/s")
    for model in models:
        for kind in ("train", "inference"):
            shape = dict(model=model, batch=batch, size=size, steps=steps)
            peers, as_shipped, ours = zip(*compared_rounds(kind, shape, rounds))
            ours_img_s, peer_img_s = median_of(ours, "img_s"), median_of(peers, "img_s")
            as_shipped_img_s = median_of(as_shipped, "img_s")
            extra = {}
            if rounds > 1:
                ratios = [o["img_s"] / p["img_s"] for o, p in zip(ours, peers)]
                extra = dict(ratio=statistics.median(ratios),
                             round_ratios=[round(r, 3) for r in ratios])
            if kind == "train":  # img/s if the step's flops ran at the matmul rate
                limit = max(peak) * 1e9 * batch / ours[0]["flops"]
                extra.update(peak_bound=limit, ours_of_bound=ours_img_s / limit,
                             peer_of_bound=peer_img_s / limit)
            record(model, f"{kind} step", ours_img_s, peer_img_s,
                   compile_s=median_of(ours, "compile_s"), peak_mb=max(o["peak_mb"] for o in ours),
                   peer_peak_mb=max(p["peak_mb"] for p in peers),
                   peer_glibc_defaults=as_shipped_img_s,
                   ratio_to_peer_glibc_defaults=ours_img_s / as_shipped_img_s, **extra)
    if freeze_model:
        freeze_sweep(freeze_model, batch, size, steps, record)
    consumed = max(r["ours"] for r in records if r["what"] == "train step")
    for dataset in ("fashion_mnist", f"synthetic:{size}x{size}x3:1000"):
        pipe = measure("ours_pipeline", dataset=dataset, batch=batch, steps=steps * 5)
        record(dataset, "input pipeline", pipe["img_s"],
               model_consumes=consumed, headroom=pipe["img_s"] / consumed)


def freeze_sweep(freeze_model: str, batch: int, size: int, steps: int, record) -> None:
    """Every freeze depth of ``freeze_model`` (and its cached prefix) in turns with full
    fine-tuning. Its deepest is the linear probe (every block but the head frozen), whose
    step on cached features is also recorded against recomputing them."""
    blocks = experiment_blocks(freeze_model)
    train = dict(model=freeze_model, batch=batch, size=size, steps=steps)

    def record_sweep(what, measured, full, **extra):
        record(freeze_model, what, measured["img_s"], speedup=measured["img_s"] / full["img_s"],
               full_img_s=full["img_s"], flops=measured["flops"], peak_mb=measured["peak_mb"],
               **extra)
    for depth in range(1, len(blocks)):  # each depth in turns with full fine-tuning
        full, ours, cached = measure_interleaved(
            [("ours_train", False, train), ("ours_train", False, dict(train, freeze_depth=depth)),
             ("ours_train", False, dict(train, freeze_depth=depth, cache_prefix=True))])
        if depth == 1:
            record_sweep("train, freeze depth 0", full, full,
                         trainable_params=full["trainable_params"])
        record_sweep(f"train, freeze depth {depth} ({', '.join(blocks[:depth])} frozen)", ours,
                     full, trainable_params=ours["trainable_params"])
        record_sweep(f"train, freeze depth {depth}, cached prefix", cached, full,
                     prefix_s_per_image=cached["prefix_s_per_image"],
                     cached_shape=cached["cached_shape"])
    record(freeze_model, "linear probe: cached vs recompute", cached["img_s"] / ours["img_s"],
           unit="× faster", cached_img_s=cached["img_s"], recompute_img_s=ours["img_s"])


def processor() -> str:
    """The CPU's model name and generation (``/proc/cpuinfo``), else what ``platform`` says."""
    info = native.cpu_info()
    if "model name" not in info:
        return platform.processor() or platform.machine()
    return f"{info['model name']} (family {info.get('cpu family')}, model {info.get('model')})"


def environment() -> dict:
    import jax
    env = dict(date=datetime.date.today().isoformat(), machine=platform.machine(),
               processor=processor(), cores=os.cpu_count(),
               dense_products="MKL's sgemm" if native.uses_mkl() else "oneDNN's matmul",
               python=platform.python_version(), jax=jax.__version__,
               xla_flags=os.environ.get("XLA_FLAGS", ""),
               glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
               buffer_cache=process.buffer_cache_preloaded(os.environ),
               torch_threads=TORCH_THREADS)
    try:
        import torch
        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = "absent"
    return env


def number(value) -> str:
    """3 significant digits, without exponents below a million."""
    if not isinstance(value, float) or abs(value) >= 1e6:
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(records: list[dict], env: dict, args) -> str:
    lines = [f"# Benchmark: transferlab vs PyTorch eager ({env['date']})", "",
             f"Machine: {env['processor']}, {env['cores']} cores; Dense layers' products on "
             f"{env['dense_products']}; Python {env['python']}, "
             f"JAX {env['jax']}, PyTorch {env['torch']} ({env['torch_threads']} threads, "
             f"channels_last); batch {args.batch}, {args.size}², fp32, {args.steps} timed steps"
             + (f" in each of {args.rounds} rounds of fresh processes (img/s the rounds' "
                "medians, ratio the median of their ratios)" if args.rounds > 1 else "") + ", "
             "the compared sides taking turns (2 steps each, after 0.25 s of untimed ones; "
             "PyTorch set up first; each freeze depth with full fine-tuning, its `speedup` "
             "against that `full_img_s`); "
             f"XLA_FLAGS `{env['xla_flags']}`; GLIBC_TUNABLES `{env['glibc_tunables']}`"
             + (" and the buffer cache" if env["buffer_cache"] else "") + " for both "
             "(`peer_glibc_defaults`: PyTorch without them, run alone after each pair).", "",
             "| model | measurement | ours | PyTorch | ratio | notes |",
             "|---|---|---|---|---|---|"]
    for r in records:
        notes = ", ".join(f"{k} {number(v)}" for k, v in r.items()
                          if k not in ("model", "what", "ours", "peer", "ratio", "unit"))
        peer = "" if r["peer"] is None else f"{r['peer']:.2f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['model']} | {r['what']} | {r['ours']:.2f} {r['unit']} | {peer} | "
                     f"{ratio} | {notes} |")
    return "\n".join(lines) + "\n"


def main():
    process.restart_tuned(always=True)  # and so its subprocesses, both sides alike
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--freeze_model", default="resnet50",
                        help="the model of the freeze sweep; '' leaves it out")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes of each compared pair this many times: img/s are "
                             "the rounds' medians, the ratio the median of their ratios")
    parser.add_argument("--quick", action="store_true", help="resnet18 only, 32² images, 2 steps")
    parser.add_argument("--small", action="store_true",
                        help=f"the protocols' scale: {', '.join(SMALL_MODELS)} at 32², batch 128, "
                             "without the freeze sweep")
    parser.add_argument("--pipeline", action="store_true",
                        help="only the input pipeline on 224² JPEGs, with 0, 1 and 2 workers")
    parser.add_argument("--out", default=".")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(MEASURES[spec.pop("name")](**spec)))
        return
    if args.quick:
        args.models, args.size, args.steps, args.freeze_model = "resnet18", 32, 2, "resnet18"
    if args.small:
        args.models, args.size, args.batch, args.freeze_model = ",".join(SMALL_MODELS), 32, 128, ""
    names = args.models.split(",")
    check_arguments(names, args.freeze_model, args.rounds)
    env, records = environment(), []
    try:
        if args.pipeline:
            pipeline_run(args.batch, args.steps, records)
        else:
            run(names, args.batch, args.size, args.steps, args.freeze_model or None,
                args.rounds, records)
    finally:  # what was measured before a failure is kept
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"environment": env, "records": records},
                                                   indent=1))
        (out / "bench.md").write_text(markdown(records, env, args))
        print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


def check_arguments(names: list[str], freeze_model: str, rounds: int) -> None:
    """Fail before measuring anything: an unknown model, or one without a PyTorch peer."""
    import models
    for option, name in [*(("--models", n) for n in names), ("--freeze_model", freeze_model)]:
        try:
            if name:
                models.model_info(name)
        except ValueError as error:
            if option == "--freeze_model":
                error = f"{error} (--freeze_model '' leaves the freeze sweep out)"
            raise SystemExit(f"{option}: {error}") from None
    unpaired = [n for n in names if n not in PEERS]
    if unpaired:
        raise SystemExit(f"no PyTorch peer for {', '.join(unpaired)}: --models takes "
                         f"{', '.join(PEERS)}")
    if rounds < 1:
        raise SystemExit(f"--rounds {rounds}: give at least 1")


if __name__ == "__main__":
    main()
