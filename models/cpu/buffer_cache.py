"""Large heap buffers kept mapped between uses (``buffer_cache.c``), preloaded by the scripts.

XLA:CPU allocates one buffer for a compiled call's temporaries and frees it when the call
returns; glibc unmaps it, so every train step faults a GiB in again. The library keeps freed
buffers of 64 MiB or more for the next request of their size. ``TRANSFERLAB_BUFFER_CACHE=0``
leaves it out.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("buffer_cache.c")
COMPILER_FLAGS = ("-O2", "-shared", "-fPIC", "-pthread", "-Wall")


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILER_FLAGS).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transferlab"
    return cache / f"buffer_cache-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile ``buffer_cache.c`` (once: the result is cached by content)."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        try:
            done = subprocess.run(["gcc", *COMPILER_FLAGS, str(SOURCE), "-o", str(built), "-ldl"],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            raise OSError("gcc is missing: `apt-get install gcc` builds the buffer cache") from None
        if done.returncode:
            raise OSError(f"building {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(built, path)  # atomic: concurrent processes each build, one file stays
    return path


def _preloads(env: dict[str, str]) -> list[str]:
    return env.get("LD_PRELOAD", "").replace(":", " ").split()


def _is_this_library(path: str) -> bool:
    return Path(path).name.startswith("buffer_cache-")


def preloaded(env: dict[str, str]) -> bool:
    """Whether ``env``'s LD_PRELOAD has this library."""
    return any(map(_is_this_library, _preloads(env)))


def with_buffer_cache(env: dict[str, str], uses_glibc: bool) -> dict[str, str]:
    """``env`` with the library added to its LD_PRELOAD, unless it is there already, the C
    library is not glibc (whose allocator it passes the rest to), or TRANSFERLAB_BUFFER_CACHE=0.
    Where it cannot be built, ``env`` unchanged and a note on stderr."""
    if not uses_glibc or env.get("TRANSFERLAB_BUFFER_CACHE") == "0" or preloaded(env):
        return env
    try:
        library = build()
    except OSError as e:
        print(f"note: large buffers are not kept between steps: {e}", file=sys.stderr)
        return env
    return {**env, "LD_PRELOAD": " ".join(filter(None, (str(library), env.get("LD_PRELOAD"))))}


def without_buffer_cache(env: dict[str, str]) -> dict[str, str]:
    """``env`` without this library in its LD_PRELOAD (and with TRANSFERLAB_BUFFER_CACHE=0)."""
    kept = [p for p in _preloads(env) if not _is_this_library(p)]
    env = {**env, "TRANSFERLAB_BUFFER_CACHE": "0", "LD_PRELOAD": " ".join(kept)}
    if not kept:
        del env["LD_PRELOAD"]
    return env
