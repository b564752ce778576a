"""Shared libraries compiled on first use and cached by content in ``~/.cache/transferlab``
(``$XDG_CACHE_HOME/transferlab``): the native kernels (``native.py``) and the buffer cache
(``process.py``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path


def cached_library(prefix: str, *contents: bytes) -> Path:
    """Where a library built from ``contents`` (sources, flags, versions) is cached: one file
    per distinct content."""
    digest = hashlib.sha256(b"".join(contents)).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transferlab"
    return cache / f"{prefix}-{digest}.so"


def compile_once(path: Path, command: list[str], libraries: list[str], what: str) -> Path:
    """``path``, compiled by ``command + ["-o", path] + libraries`` unless it exists already:
    into a temporary file first, renamed when complete (concurrent processes may each build,
    one file stays). An OSError naming ``what`` where the compiler is missing or fails."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        try:
            done = subprocess.run([*command, "-o", str(built), *libraries], capture_output=True,
                                  text=True)
        except FileNotFoundError:
            raise OSError(f"{command[0]} is missing: `apt-get install {command[0]}` builds "
                          f"{what}") from None
        if done.returncode:
            raise OSError(f"building {what} failed:\n{done.stderr[-2000:]}")
        os.replace(built, path)
    return path
