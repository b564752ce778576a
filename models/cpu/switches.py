"""Every environment switch of the CPU speed layer, in one table.

Each is read when it takes effect (the kernel choices while tracing, the process settings when
a script starts), so a test or a user can change one between two traces. Nothing else in the
project reads a ``TRANSFERLAB_*`` variable.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Switch:
    name: str
    default: str
    values: tuple[str, ...]
    meaning: str


SWITCHES = {s.name: s for s in (
    Switch("TRANSFERLAB_NATIVE", "1", ("1", "0"),
           "0: no native kernels (oneDNN, MKL, this project's csrc/); XLA's own lowering for all"),
    Switch("TRANSFERLAB_WINOGRAD", "1", ("1", "0"),
           "0: 3×3 stride-1 convolutions run direct, not as Winograd's F(4×4, 3×3)"),
    Switch("TRANSFERLAB_MKL", "", ("", "1", "0"),
           "Dense products on MKL's sgemm (1) or oneDNN's matmul (0); empty: MKL on Intel CPUs"),
    Switch("TRANSFERLAB_PROCESS_TUNING", "0", ("0", "1"),
           "1: the scripts restart themselves once with glibc's huge pages and the buffer cache"),
    Switch("TRANSFERLAB_HUGE_PAGES", "1", ("1", "0"),
           "with PROCESS_TUNING=1, 0 leaves glibc's huge pages out"),
    Switch("TRANSFERLAB_BUFFER_CACHE", "1", ("1", "0"),
           "with PROCESS_TUNING=1, 0 leaves the buffer cache (buffer_cache.c) out"),
)}


def value(name: str, env=None) -> str:
    """The switch's value in ``env`` (``os.environ`` by default), or its default; a value the
    switch does not take is a ValueError naming the values it does."""
    switch = SWITCHES[name]
    found = (os.environ if env is None else env).get(name, switch.default)
    if found not in switch.values:
        allowed = " or ".join(repr(v) for v in switch.values)
        raise ValueError(f"{name}={found!r}: set it to {allowed} ({switch.meaning}).")
    return found


def on(name: str, env=None) -> bool:
    """Whether the switch is "1" (see ``value``)."""
    return value(name, env) == "1"
