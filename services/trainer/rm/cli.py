"""`rlhf train rm`: train a reward model (Bradley-Terry on pairs, or binned ratings).

Data parallel: `torchrun --nproc-per-node N -m rlhf.cli train rm ...` (gloo on CPU, NCCL with one
GPU per rank); `--batch-size` stays the global batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rlhf.plumbing.config import ConfigError
from services.trainer.rm.settings import RMSettings
from services.trainer.settings import option


def _option(name: str, *decls: str, **kwargs):
    return option(RMSettings, name, *decls, **kwargs)


@click.command("rm")
@_option("data", type=click.Path(dir_okay=False, path_type=Path))
@_option("out", type=click.Path(file_okay=False, path_type=Path))
@_option("model")
@_option("init_from", type=click.Path(file_okay=False, path_type=Path))
@_option("val_file", type=click.Path(dir_okay=False, path_type=Path))
@_option("val_fraction")
@_option("backbone")
@_option("lora_r")
@_option("lora_alpha")
@_option("lora_targets", "--lora-target")
@_option("lora_last_layers")
@_option("bins")
@_option("epochs")
@_option("batch_size")
@_option("lr")
@_option("head_lr")
@_option("max_length")
@_option("seed")
@_option("checkpoint_every")
@_option("max_steps")
@_option("merge")
@_option("restart", is_flag=True)
@_option("skip_bad_lines", is_flag=True)
@_option("report_to")
@_option("device")
@_option("threads")
@_option("progress")
def train_rm(**options):
    """Train a reward model (Bradley-Terry on pairs, or binned ratings)."""
    import torch

    from services.trainer.distributed import process_group
    from services.trainer.errors import DataError, TrainError
    from services.trainer.rm.train import RewardTrainer

    try:
        settings = RMSettings.load(None, **options)
    except ConfigError as exc:  # e.g. --report-to naming a package not installed
        raise click.UsageError(str(exc)) from None
    if settings.threads:
        torch.set_num_threads(settings.threads)
    settings.out.mkdir(parents=True, exist_ok=True)
    cuda = settings.device.startswith("cuda") or (settings.device == "auto"
                                                  and torch.cuda.is_available())
    with process_group("nccl" if cuda else "gloo"):
        try:
            RewardTrainer(settings).run()
        except DataError as exc:
            click.echo(f"error: bad training data:\n{exc}", err=True)
            sys.exit(1)
        except TrainError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
