"""A reward model's training data: the examples (data.read_rm) split into training and
validation, and the rating bins a ratings file trains."""

from __future__ import annotations

import random
from collections.abc import Callable

from services.trainer.data import Pair, Rated, read_rm
from services.trainer.errors import DataError, TrainError
from services.trainer.rm.settings import RMSettings


def load_examples(path, skip_bad: bool, warn: Callable[[str], None]) -> list[Pair] | list[Rated]:
    """The file's examples; DataError on any bad line, or with skip_bad each bad line is told to
    `warn` and the good ones are kept (none good: DataError)."""
    problems: list[str] = []
    examples = read_rm(path, problems)
    if problems and (not skip_bad or not examples):
        raise DataError(problems)
    for problem in problems:
        warn(f"skipped {problem}")
    return examples


def split(settings: RMSettings, warn: Callable[[str], None]) -> tuple[list, list]:
    """(training, validation) examples: --val-file, or a seeded --val-fraction of --data."""
    s = settings
    examples = load_examples(s.data, s.skip_bad_lines, warn)
    if s.val_file is not None:
        val = load_examples(s.val_file, s.skip_bad_lines, warn)
        train = examples
    else:
        order = list(range(len(examples)))
        random.Random(s.seed).shuffle(order)
        n_val = round(len(order) * s.val_fraction)
        val = [examples[i] for i in order[:n_val]]
        train = [examples[i] for i in order[n_val:]]
    if not train:
        raise TrainError(f"{s.data}: no training examples left after the validation split")
    if len({type(x) for x in [*train, *val]}) > 1:
        raise TrainError("the training and validation files hold different kinds of data "
                         "(preference vs ratings)")
    return train, val


def rating_bins(ratings: list[float], k: int | None) -> list[float]:
    """Bin values: the integers from min to max when ratings are integers (and k is unset or
    matches), else k evenly spaced values from min to max."""
    lo, hi = min(ratings), max(ratings)
    integral = all(float(r).is_integer() for r in ratings)
    if integral and (k is None or k == int(hi - lo) + 1) and hi - lo + 1 <= 64:
        return [float(v) for v in range(int(lo), int(hi) + 1)]
    if k is None:
        raise TrainError("ratings are not all integers (or span more than 64 values): "
                         "give the number of bins with --bins K")
    if k < 2 or hi == lo:
        raise TrainError(f"need at least 2 bins and 2 distinct ratings (got k={k}, "
                         f"ratings {lo}..{hi})")
    return [lo + (hi - lo) * i / (k - 1) for i in range(k)]


def bin_index(rating: float, bins: list[float]) -> int:
    return min(range(len(bins)), key=lambda i: abs(bins[i] - rating))
