"""`rlhf train sft`: LoRA supervised fine-tuning; prints the adapter folder.

Data parallel: `torchrun --nproc-per-node N -m rlhf.cli train sft ...` (gloo on CPU, NCCL with one
GPU per rank); `--batch-size` stays the global batch.
"""

from __future__ import annotations

from pathlib import Path

import click

from rlhf.plumbing.config import ConfigError
from services.trainer.settings import LORA_TARGET_MODULES, option, split_target_modules
from services.trainer.sft.settings import SFTSettings


def _option(name: str, *decls: str, **kwargs):
    return option(SFTSettings, name, *decls, **kwargs)


@click.command("sft")
@_option("model", type=click.Path(file_okay=False, path_type=Path), show_default=False)
@_option("data", type=click.Path(dir_okay=False, path_type=Path))
@_option("out", type=click.Path(file_okay=False, path_type=Path))
@_option("epochs")
@_option("lr")
@_option("batch_size")
@_option("max_length")
@_option("lora_r")
@_option("lora_alpha")
@_option("target_modules", default=(), callback=split_target_modules,
         help=f"{SFTSettings.model_fields['target_modules'].description} "
              f"[default: {','.join(LORA_TARGET_MODULES)}]")
@_option("seed")
@_option("packing", "--no-packing", flag_value=False, show_default=False)
@_option("report_to")
def train_sft(**flags) -> None:
    """LoRA supervised fine-tuning; writes a peft adapter folder that PPO starts from.

    Progress goes to stderr and only the adapter folder to stdout.
    """
    from services.trainer.distributed import process_group
    from services.trainer.errors import DataError, TrainError
    from services.trainer.sft.train import resolve_device, run_sft

    try:
        settings = SFTSettings.load(None, **flags)
    except ConfigError as exc:  # e.g. --report-to naming a package not installed
        raise click.UsageError(str(exc)) from None
    backend = "nccl" if resolve_device(settings.device).type == "cuda" else "gloo"
    with process_group(backend) as ranks:
        try:
            folder = run_sft(settings)
        except (DataError, TrainError) as exc:
            raise click.ClickException(str(exc)) from None
    if ranks.is_main:
        click.echo(str(folder))
