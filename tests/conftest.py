import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Reference comparisons hold logits to 1e-4; Winograd's kernels (the CPU default for 3×3
# stride-1 convolutions) move Inception v3's by up to 1.3e-4. Tests run direct convolutions;
# the Winograd tests (tests/cpu/test_native.py, test_winograd.py) turn them on with `winograd`.
os.environ.setdefault("TRANSFERLAB_WINOGRAD", "0")
# Many tests compile the same programs (a model's initialiser, a train step), some in
# subprocesses (the benchmark's, two-process training's) or in the other xdist worker: one
# persistent XLA compilation cache for the session and its subprocesses compiles each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="transferlab-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402


@pytest.fixture
def winograd(monkeypatch):
    """Winograd's kernels for functions traced in the test (the library's default)."""
    monkeypatch.setenv("TRANSFERLAB_WINOGRAD", "1")


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A TFDS data directory shared by the session's tests (datasets are prepared once)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def make_config(tfds_dir):
    """``make_config("fashion_mnist.py", "k=v,…")``: a config reading the session's data dir."""
    from research import config

    def make(name: str = "fashion_mnist.py", overrides: str = ""):
        root = Path(__file__).resolve().parents[1] / "configs"
        spec = f"{root / name}:data.tfds_dir={tfds_dir},train.progress=False"
        return config.load(spec + ("," + overrides if overrides else ""))
    return make
