"""The process settings (``models/cpu/process.py``): importing ``models`` sets XLA:CPU's flags
and nothing else; the scripts run in the user's process unless TRANSFERLAB_PROCESS_TUNING=1
restarts them with glibc's huge pages and the buffer cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.cpu import process

ROOT = Path(__file__).resolve().parents[2]
needs_glibc = pytest.mark.skipif(
    not process.glibc_has_hugetlb(), reason="glibc 2.35 or newer has the hugetlb tunable; this "
    f"is {process.libc_version() or 'another C library'}")
SETTINGS = ("GLIBC_TUNABLES", "LD_PRELOAD", "XLA_FLAGS", "TRANSFERLAB_PROCESS_TUNING",
            "TRANSFERLAB_HUGE_PAGES", "TRANSFERLAB_BUFFER_CACHE")


def run_python(code: str, *args, **env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, env={**base, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


IMPORT_MODELS = """
import os
before = dict(os.environ)
import models
from jax._src import xla_bridge
changed = sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k))
print(*changed, xla_bridge.backends_are_initialized())
"""


def test_importing_models_sets_xla_flags_only_and_before_jax_starts_its_backends():
    assert run_python(IMPORT_MODELS) == ["XLA_FLAGS", "False"]


def test_a_users_own_xla_flag_wins():
    code = "import os, models; print(os.environ['XLA_FLAGS'])"
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert run_python(code, XLA_FLAGS=mine) == [mine]
    assert run_python(code, XLA_FLAGS="--xla_dump_to=/tmp/x") == [
        "--xla_dump_to=/tmp/x", process.CPU_XLA_FLAGS]


# A script's entry point: "start" once per time the process starts, then what main() sees.
SCRIPT = """
import os, sys
from scripts import common
print("start", sys.argv[1:], flush=True)
common.run_main(lambda: print(os.environ.get("GLIBC_TUNABLES"), os.environ.get("LD_PRELOAD")))
"""


def test_a_script_runs_in_the_users_process_by_default():
    assert run_python(SCRIPT, "--x") == ["start", "['--x']", "None", "None"]


@needs_glibc
def test_process_tuning_restarts_a_script_once_with_its_arguments_huge_pages_and_the_buffer_cache():
    assert run_python(SCRIPT, "--x", TRANSFERLAB_PROCESS_TUNING="1") == [
        "start", "['--x']", "start", "['--x']",  # started twice, with the same arguments
        process.HUGE_PAGES, str(process.build_buffer_cache())]


@needs_glibc
def test_each_setting_has_its_switch_off():
    out = run_python(SCRIPT, TRANSFERLAB_PROCESS_TUNING="1", TRANSFERLAB_HUGE_PAGES="0")
    assert out[-2:] == ["None", str(process.build_buffer_cache())]
    out = run_python(SCRIPT, TRANSFERLAB_PROCESS_TUNING="1", TRANSFERLAB_BUFFER_CACHE="0")
    assert out[-2:] == [process.HUGE_PAGES, "None"]


def test_a_bad_switch_value_names_the_values_it_takes():
    with pytest.raises(ValueError, match="TRANSFERLAB_HUGE_PAGES='no'.*'1' or '0'"):
        process.with_huge_pages({"TRANSFERLAB_HUGE_PAGES": "no"})


@needs_glibc
def test_huge_pages_are_added_to_the_users_tunables_and_never_twice():
    added = process.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert added["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{process.HUGE_PAGES}"
    assert process.with_huge_pages(added) == added
    assert process.with_huge_pages({})["GLIBC_TUNABLES"] == process.HUGE_PAGES


def test_a_users_own_choice_wins():
    for env in ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {"TRANSFERLAB_HUGE_PAGES": "0"}):
        assert process.with_huge_pages(env) == env


@needs_glibc
def test_untuned_takes_out_what_tuned_added_and_keeps_the_users_own():
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "LD_PRELOAD": "/x/libmine.so"}
    untuned = process.untuned_environment(process.tuned_environment(mine))
    assert untuned == {**mine, "TRANSFERLAB_HUGE_PAGES": "0", "TRANSFERLAB_BUFFER_CACHE": "0"}
    assert process.tuned_environment(untuned) == untuned
    assert process.untuned_environment(process.tuned_environment({})) == {
        "TRANSFERLAB_HUGE_PAGES": "0", "TRANSFERLAB_BUFFER_CACHE": "0"}


FAULTS = """
import resource, jax, jax.numpy as jnp
add = jax.jit(lambda x: x + 1)
x = jnp.zeros((64, 1024, 1024))  # 256 MiB
jax.block_until_ready(add(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
jax.block_until_ready(add(x))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def transparent_huge_pages() -> bool:
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[never]" not in setting.read_text()


@needs_glibc
@pytest.mark.skipif(not transparent_huge_pages(), reason="the kernel's huge pages are off")
def test_huge_pages_spare_xla_a_page_fault_per_4_kib_of_output():
    plain = int(run_python(FAULTS)[0])
    huge = int(run_python(FAULTS, GLIBC_TUNABLES=process.HUGE_PAGES)[0])
    assert plain > 256 * 1024 // 4 * 0.9  # a fault per 4 KiB page of the fresh output
    assert huge * 20 < plain
