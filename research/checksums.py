"""SHA-256 manifests of a directory's files, in ``sha256sum``'s format (``sha256sum -c
SHA256SUMS`` run inside the directory checks one as well).

``research.checkpoints`` writes one into every step directory once orbax has finalized it and
checks it before that step is restored.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MANIFEST = "SHA256SUMS"
_TMP = f".{MANIFEST}.tmp"


def digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files(directory: Path) -> list[str]:
    """Every file under ``directory`` by relative path, sorted: what its manifest lists (all
    but the manifest itself; manifests of subdirectories are listed like any file)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() not in (MANIFEST, _TMP))


def write(directory: str | Path) -> Path:
    """Write ``directory/SHA256SUMS`` over every file under it (written to a temporary file
    and renamed, so a manifest is whole or absent)."""
    directory = Path(directory)
    lines = "".join(f"{digest(directory / name)}  {name}\n" for name in files(directory))
    tmp = directory / _TMP
    tmp.write_text(lines)
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def has_manifest(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def problems(directory: str | Path) -> list[str]:
    """What differs from ``directory``'s manifest: files changed, missing or added; empty
    where every file matches."""
    directory = Path(directory)
    expected = {}
    for line in (directory / MANIFEST).read_text().splitlines():
        checksum, _, name = line.partition("  ")
        expected[name] = checksum
    found = []
    for name, checksum in expected.items():
        if not (directory / name).is_file():
            found.append(f"{name} is missing")
        elif digest(directory / name) != checksum:
            found.append(f"{name} has other bytes")
    found += [f"{name} is not in {MANIFEST}" for name in files(directory) if name not in expected]
    return found
