"""The scripts' CPU defaults: glibc's huge pages for large buffers and the buffer cache that
keeps them mapped between steps (``scripts/buffer_cache.c``), set by restarting."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.cpu import buffer_cache
from scripts import common

ROOT = Path(__file__).resolve().parents[2]
needs_glibc = pytest.mark.skipif(
    not common.glibc_has_hugetlb(), reason="glibc 2.35 or newer has the hugetlb tunable; this is "
    f"{common.libc_version() or 'another C library'}")


@needs_glibc
def test_tunables_are_added_to_the_users_and_never_twice():
    added = common.with_cpu_glibc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert added["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{common.CPU_GLIBC_TUNABLES}"
    assert common.with_cpu_glibc_tunables(added) == added
    assert common.with_cpu_glibc_tunables({})["GLIBC_TUNABLES"] == common.CPU_GLIBC_TUNABLES


def test_a_users_own_choice_wins():
    for env in ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {"TRANSFERLAB_HUGE_PAGES": "0"}):
        assert common.with_cpu_glibc_tunables(env) == env


def run_python(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "TRANSFERLAB_HUGE_PAGES", "LD_PRELOAD",
                         "TRANSFERLAB_BUFFER_CACHE")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**base, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@needs_glibc
def test_a_script_restarts_itself_with_the_tunables_the_buffer_cache_and_its_arguments():
    code = ("import ctypes, os, sys; from scripts import common; common.set_cpu_defaults(); "
            "print(os.environ['GLIBC_TUNABLES'], os.environ['LD_PRELOAD'], len(sys.argv), "
            "ctypes.CDLL(None).transferlab_buffer_cache_bytes(0))")
    assert run_python(code) == [common.CPU_GLIBC_TUNABLES, str(buffer_cache.build()), "1", "0"]


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
    plain = int(run_python(FAULTS, TRANSFERLAB_HUGE_PAGES="0")[0])
    huge = int(run_python(FAULTS, GLIBC_TUNABLES=common.CPU_GLIBC_TUNABLES)[0])
    assert plain > 256 * 1024 // 4 * 0.9  # a fault per 4 KiB page of the fresh output
    assert huge * 20 < plain
