"""The two mistakes a training stage reports without a traceback: bad data (`DataError`, every bad
line as `file:line: reason`) and a set-up it cannot run with (`TrainError`)."""

from __future__ import annotations

# Enough to see the pattern of a broken file without flooding a terminal.
MAX_LISTED_ERRORS = 20


class DataError(ValueError):
    """Bad data file: `.errors` holds every problem as `file:line: reason` (or `file: reason`)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        shown = self.errors[:MAX_LISTED_ERRORS]
        if len(self.errors) == 1:
            message = self.errors[0]
        else:
            message = f"{len(self.errors)} problems in the data:\n" + "\n".join(
                f"  {e}" for e in shown
            )
            if len(self.errors) > len(shown):
                message += f"\n  ... and {len(self.errors) - len(shown)} more"
        super().__init__(message)


class TrainError(Exception):
    """A stage's set-up is unusable (model folder, LoRA targets, settings that contradict a
    checkpoint): the command prints the message and exits 1."""
