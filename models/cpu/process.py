"""The CPU speed layer's process settings: XLA:CPU's flags, and the opt-in memory settings.

Importing ``models`` calls ``set_xla_flags`` and changes nothing else in the process.

The memory settings are glibc's huge pages for large buffers (``HUGE_PAGES``) and the buffer
cache (``buffer_cache.c``, preloaded: freed buffers of 64 MiB or more stay mapped for the next
request of their size). They change how memory is mapped, never a value. glibc reads its
tunables and preloads only when a process starts, so they take a restart: ``restart_tuned``
starts a script again with them where the user opts in with ``TRANSFERLAB_PROCESS_TUNING=1``
(the benchmark opts in for both its sides); ``TRANSFERLAB_HUGE_PAGES=0`` and
``TRANSFERLAB_BUFFER_CACHE=0`` leave either out. In a program of your own, start Python with
the environment ``tuned_environment(dict(os.environ))`` returns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from models.cpu import build, switches

# XLA:CPU's YNNPACK fusion of individual convolutions is slower than its default convolution
# path for the networks here. The flag names XLA:CPU, so other backends ignore it.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

# Transparent huge pages for malloc's own mappings: Linux faults them in 2 MiB at a time, not 4 KiB.
HUGE_PAGES = "glibc.malloc.hugetlb=1"

BUFFER_CACHE_SOURCE = Path(__file__).with_name("buffer_cache.c")
BUFFER_CACHE_FLAGS = ("-O2", "-shared", "-fPIC", "-pthread", "-Wall")


def set_xla_flags() -> None:
    """Add ``CPU_XLA_FLAGS`` to ``XLA_FLAGS`` unless the user's own setting names that flag.
    It takes effect where JAX has not yet started its CPU backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAGS}".strip()


def restart_tuned(always: bool = False) -> None:
    """Where ``TRANSFERLAB_PROCESS_TUNING=1`` (or ``always``) and the process lacks them, start
    it again, once, with the same interpreter and arguments (``os.execve``) and the memory
    settings in its environment; otherwise return, having changed nothing."""
    if not (always or switches.on("TRANSFERLAB_PROCESS_TUNING")):
        return
    env = tuned_environment(dict(os.environ))
    if env != os.environ:
        os.execve(sys.executable, sys.orig_argv, env)


def tuned_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` with glibc's huge pages and the buffer cache, each where it applies."""
    return with_buffer_cache(with_huge_pages(env))


def untuned_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the memory settings, and with their switches off so that
    ``restart_tuned`` adds neither back."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != HUGE_PAGES]
    preloads = [p for p in _preloads(env) if not _is_buffer_cache(p)]
    env = {k: v for k, v in env.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    env.update(TRANSFERLAB_HUGE_PAGES="0", TRANSFERLAB_BUFFER_CACHE="0")
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    if preloads:
        env["LD_PRELOAD"] = " ".join(preloads)
    return env


def with_huge_pages(env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``HUGE_PAGES`` added to its GLIBC_TUNABLES, unless its tunables name
    ``glibc.malloc.hugetlb`` already, the C library is not glibc 2.35 or newer, or
    ``TRANSFERLAB_HUGE_PAGES=0``."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if ("glibc.malloc.hugetlb" in tunables or not switches.on("TRANSFERLAB_HUGE_PAGES", env)
            or not glibc_has_hugetlb()):
        return env
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES)))}


def with_buffer_cache(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the buffer cache added to its LD_PRELOAD, unless it is there already, the C
    library is not glibc (whose allocator it passes the rest to), or
    ``TRANSFERLAB_BUFFER_CACHE=0``. Where it cannot be built, ``env`` and a note on stderr."""
    if (not switches.on("TRANSFERLAB_BUFFER_CACHE", env) or buffer_cache_preloaded(env)
            or not libc_version().startswith("glibc")):
        return env
    try:
        library = build_buffer_cache()
    except OSError as e:
        print(f"note: large buffers are not kept between steps: {e}", file=sys.stderr)
        return env
    return {**env, "LD_PRELOAD": " ".join(filter(None, (str(library), env.get("LD_PRELOAD"))))}


def buffer_cache_preloaded(env: dict[str, str]) -> bool:
    """Whether ``env``'s LD_PRELOAD has the buffer cache."""
    return any(map(_is_buffer_cache, _preloads(env)))


def build_buffer_cache() -> Path:
    """The buffer cache's shared library, compiled with gcc on first use and cached by content
    in ``~/.cache/transferlab``."""
    path = build.cached_library("buffer_cache", BUFFER_CACHE_SOURCE.read_bytes(),
                                " ".join(BUFFER_CACHE_FLAGS).encode())
    return build.compile_once(path, ["gcc", *BUFFER_CACHE_FLAGS, str(BUFFER_CACHE_SOURCE)],
                              ["-ldl"], "the buffer cache")


def _preloads(env: dict[str, str]) -> list[str]:
    return env.get("LD_PRELOAD", "").replace(":", " ").split()


def _is_buffer_cache(path: str) -> bool:
    return Path(path).name.startswith("buffer_cache-")


def libc_version() -> str:
    """The C library's name and version ("glibc 2.36"), or "" where it does not say."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return ""


def glibc_has_hugetlb() -> bool:
    """Whether the C library is glibc 2.35 or newer, which has the hugetlb tunable."""
    library, _, version = libc_version().partition(" ")
    return library == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
