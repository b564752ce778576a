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


# Under CI (the environment's CI set and not empty) a skip fails the run unless its reason says
# the machine cannot run the test: a missing reference package, a preset KERAS_BACKEND or a
# native library that did not build must not pass unseen. Reasons start with one of these.
MACHINE_SKIPS = ("the kernel's huge pages are off", "the clones are x86-64's")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_a_skip_ci_cannot_accept(report) -> None:
    if not (os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail")):
        return
    reason = _skip_reason(report)
    if not reason.startswith(MACHINE_SKIPS):
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI: {reason}\nCI must run every test: install what it "
                           "needs (`make setup`); a skip the machine cannot avoid belongs in "
                           "MACHINE_SKIPS (tests/conftest.py)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_a_skip_ci_cannot_accept(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_a_skip_ci_cannot_accept(report)
    return report
