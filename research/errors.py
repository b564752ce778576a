"""Errors that tell the user what is wrong and how to fix it."""


class ConfigError(ValueError):
    """A config key, value or combination that cannot work."""


class DataError(FileNotFoundError):
    """A dataset that is missing or malformed."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


def mismatch_report(missing=(), unexpected=(), misshaped=(), limit: int = 50) -> str:
    """Lists missing, unexpected and mis-shaped parameter paths, each group sorted."""
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
        items = sorted(items)
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines += [f"    {item}" for item in items[:limit]]
            if len(items) > limit:
                lines.append(f"    … and {len(items) - limit} more")
    return "\n".join(lines)


class TrainingDiverged(FloatingPointError):
    """A loss or parameter that is no longer finite: the run stops before saving it."""


class Interrupted(Exception):
    """A run stopped by SIGTERM or SIGINT once its current step was saved; the command exits
    with ``exit_status`` (128 + the signal's number, as a shell reports a process it ended)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status
