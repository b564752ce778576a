"""Shared command-line set-up: CPU performance flags, multi-host start-up, clean errors."""

from __future__ import annotations

import os
import sys

from models.ops import set_cpu_defaults  # noqa: F401  (the scripts call it before JAX starts)


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
