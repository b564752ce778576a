"""The buffer cache (``models/cpu/buffer_cache.c``): freed large buffers serve the next
request of their size, everything else is glibc's, and the values computed do not change."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.cpu import process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not process.libc_version().startswith("glibc"),
                                reason="the buffer cache passes the rest to glibc's allocator; "
                                f"this is {process.libc_version() or 'another C library'}")
MIB = 1 << 20


def run_python(code: str, cache: bool) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "TRANSFERLAB_BUFFER_CACHE")}
    if cache:
        env["LD_PRELOAD"] = str(process.build_buffer_cache())
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


LIBC = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.realloc.restype = libc.memalign.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.memalign.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.restype = libc.transferlab_buffer_cache_bytes.restype = ctypes.c_size_t
MIB = 1 << 20
kept = lambda idle_only=1: libc.transferlab_buffer_cache_bytes(idle_only) // MIB
"""


def test_a_freed_large_buffer_serves_the_next_request_of_its_size():
    code = LIBC + """
a = libc.malloc(100 * MIB)
print(a % (2 * MIB), libc.malloc_usable_size(a) // MIB, kept(0), kept())
libc.free(a)
print(kept(), libc.malloc(90 * MIB) == a, kept())  # 90 MiB fits the 100 MiB buffer
print(libc.malloc(40 * MIB) % (2 * MIB) != 0, libc.malloc(300 * MIB) != a)
print(libc.memalign(4096, 80 * MIB) != a, kept(0))
print(libc.memalign(4 * MIB, 80 * MIB) % (4 * MIB), kept(0))
"""
    assert run_python(code, cache=True) == [
        "0", "100", "100", "0",  # aligned to a huge page, in use
        "100", "True", "0",  # kept while free, taken again
        "True", "True",  # below 64 MiB: glibc's; 300 MiB: a new buffer, not the used one
        "True", "480",  # no free buffer: a new one (100 + 300 + 80 MiB in use)
        "0", "480"]  # an alignment above 2 MiB: glibc's


def test_at_most_four_idle_buffers_stay_mapped_the_longest_idle_unmapped_first():
    code = LIBC + """
sizes = [64, 70, 80, 90, 100, 110]
buffers = [libc.malloc(s * MIB) for s in sizes]
for b in buffers:
    libc.free(b)
print(kept(), kept(0), libc.malloc(64 * MIB) == buffers[0], libc.malloc(100 * MIB) == buffers[4])
"""
    assert run_python(code, cache=True) == [str(80 + 90 + 100 + 110)] * 2 + ["False", "True"]


def test_idle_buffers_too_small_for_a_new_request_are_unmapped():
    code = LIBC + """
small, large = libc.malloc(70 * MIB), libc.malloc(500 * MIB)
libc.free(small)
libc.free(large)
print(kept(), libc.malloc(200 * MIB) != large, kept(0))  # 500 MiB is over twice the request
"""
    assert run_python(code, cache=True) == ["570", "True", "700"]


def test_realloc_keeps_the_contents_across_glibc_and_the_cache():
    code = LIBC + """
small = libc.malloc(1000)
ctypes.memset(small, 7, 1000)
large = libc.realloc(small, 70 * MIB)  # glibc's to ours
ctypes.memset(large + 1000, 9, 70 * MIB - 1000)
same = libc.realloc(large, 60 * MIB)  # shrinks in place
larger = libc.realloc(same, 200 * MIB)
read = ctypes.string_at(larger, 1000) + ctypes.string_at(larger + 60 * MIB - 10, 10)
back = libc.realloc(larger, 500)  # ours to glibc's
print(same == large, larger != large, read == bytes([7]) * 1000 + bytes([9]) * 10,
      ctypes.string_at(back, 500) == bytes([7]) * 500, kept(0))
libc.free(back)
"""
    assert run_python(code, cache=True) == ["True", "True", "True", "True", "270"]  # both idle


def test_threads_taking_and_freeing_buffers_never_share_one():
    code = LIBC + """
import threading
clashes = []
def work(marker):
    for i in range(50):
        p = libc.malloc((64 + 8 * (i % 3)) * MIB)
        ctypes.memset(p, marker, 4096)
        if ctypes.string_at(p, 4096) != bytes([marker]) * 4096:
            clashes.append(marker)
        libc.free(p)
threads = [threading.Thread(target=work, args=(m,)) for m in range(1, 5)]
for t in threads: t.start()
for t in threads: t.join()
print(len(clashes), kept(0) == kept(), kept() <= 4 * 80)
"""
    assert run_python(code, cache=True) == ["0", "True", "True"]


XLA_STEPS = """
import resource, jax, jax.numpy as jnp, numpy as np
w = jnp.ones((1024, 1))
step = jax.jit(lambda x: jnp.tanh(x) @ w)  # the product's operand: a 256 MiB temporary
x = jnp.asarray(np.random.default_rng(0).normal(size=(64 * 1024, 1024)), jnp.float32)
first = np.asarray(step(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
again = [np.asarray(step(x)) for _ in range(3)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
      all(np.array_equal(first, a) for a in again), float(first.sum()))
"""


def test_xla_steps_fault_no_pages_in_again_and_compute_the_same():
    plain_faults, plain_equal, plain_sum = run_python(XLA_STEPS, cache=False)
    cached_faults, cached_equal, cached_sum = run_python(XLA_STEPS, cache=True)
    assert plain_equal == cached_equal == "True" and plain_sum == cached_sum
    assert int(plain_faults) > 3 * 128  # each step maps its temporary afresh
    assert int(cached_faults) * 5 < int(plain_faults)  # 196 against 2,310 with huge pages


def test_the_library_is_added_once_and_a_users_choice_wins(monkeypatch):
    library = str(process.build_buffer_cache())
    added = process.with_buffer_cache({"LD_PRELOAD": "/x/libmine.so"})
    assert added["LD_PRELOAD"] == f"{library} /x/libmine.so"
    assert process.buffer_cache_preloaded(added) and process.with_buffer_cache(added) == added
    assert process.with_buffer_cache({"TRANSFERLAB_BUFFER_CACHE": "0"}) == {
        "TRANSFERLAB_BUFFER_CACHE": "0"}
    monkeypatch.setattr(process, "libc_version", lambda: "musl")
    assert process.with_buffer_cache({}) == {}


def test_a_library_that_does_not_build_leaves_the_environment_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(process, "BUFFER_CACHE_SOURCE", Path("/nonexistent/buffer_cache.c"))
    assert process.with_buffer_cache({"A": "1"}) == {"A": "1"}
    assert "large buffers are not kept" in capsys.readouterr().err
