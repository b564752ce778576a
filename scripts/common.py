"""Shared command-line set-up: CPU performance defaults, multi-host start-up, clean errors."""

from __future__ import annotations

import os
import sys

from models.cpu import buffer_cache

# glibc's malloc maps each large buffer afresh (and unmaps it when freed), and Linux faults it
# in 4 KiB at a time: a MobileNetV2 train step (batch 16, 224²) takes 317,000 page faults, half
# of its CPU time in the kernel. With transparent huge pages on malloc's own mappings it takes
# 800, and runs 1.6× faster. glibc reads its tunables once, at start-up.
CPU_GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"


def with_cpu_glibc_tunables(env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``CPU_GLIBC_TUNABLES`` added to its GLIBC_TUNABLES, unless the setting is
    there already, the C library is not glibc 2.35 or newer, or TRANSFERLAB_HUGE_PAGES=0."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if ("glibc.malloc.hugetlb" in tunables or env.get("TRANSFERLAB_HUGE_PAGES") == "0"
            or not glibc_has_hugetlb()):
        return env
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, CPU_GLIBC_TUNABLES)))}


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


def with_cpu_memory_settings(env: dict[str, str]) -> dict[str, str]:
    """``env`` with glibc's tunables and the buffer cache (``scripts/buffer_cache.py``)."""
    return buffer_cache.with_buffer_cache(with_cpu_glibc_tunables(env),
                                          uses_glibc=libc_version().startswith("glibc"))


def set_cpu_defaults() -> None:
    """The project's CPU defaults, set before JAX starts: glibc's tunables and the buffer cache
    (for which the script starts again, same arguments, when they are missing) and XLA's
    flags."""
    env = with_cpu_memory_settings(dict(os.environ))
    if env != os.environ:
        os.execve(sys.executable, sys.orig_argv, env)
    from models.cpu import dispatch as ops
    ops.set_cpu_defaults()


def config_and_workdir_args(description: str):
    """``--config configs/NAME.py[:k=v,…]`` and ``--workdir DIR`` from the command line."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:key=value,…]")
    parser.add_argument("--workdir", required=True)
    return parser.parse_args()


def start_distributed() -> None:
    """Join a multi-host run when the launcher's environment says so (JAX_COORDINATOR_ADDRESS
    with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a cluster JAX detects itself)."""
    import jax
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))


def run_main(main) -> None:
    """Run ``main()``; transferlab's own errors print as one clear line, not a traceback."""
    from research.errors import CheckpointError, ConfigError, DataError
    try:
        main()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
