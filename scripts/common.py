"""What the scripts share: their command-line arguments, multi-host start-up, clean errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import jax

from models.cpu import process
from research import guard
from research.errors import (CheckpointError, ConfigError, DataError, Interrupted,
                             TrainingDiverged)


def config_and_workdir_args(description: str) -> argparse.Namespace:
    """``--config configs/NAME.py[:k=v,…]`` and ``--workdir DIR`` from the command line."""
    return config_and_workdir_parser(description).parse_args()


def config_and_workdir_parser(description: str) -> argparse.ArgumentParser:
    """The parser of ``config_and_workdir_args``, for a command to add its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:key=value,…]")
    parser.add_argument("--workdir", required=True)
    return parser


def start_distributed() -> None:
    """Join a multi-host run when the launcher's environment says so (JAX_COORDINATOR_ADDRESS
    with JAX_NUM_PROCESSES and JAX_PROCESS_ID)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))


def run_main(main, *, trains: bool = False) -> None:
    """Run ``main()`` in this process (restarted first only where the user opts in with
    ``TRANSFERLAB_PROCESS_TUNING=1``: ``models.cpu.process.restart_tuned``); transferlab's own
    errors print as one clear line, not a traceback (exit status 2). A command that ``trains``
    saves its step on SIGTERM or SIGINT and exits 143 or 130 (``research.guard``)."""
    process.restart_tuned()
    try:
        with guard.handle_stop_signals() if trains else contextlib.nullcontext():
            main()
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
