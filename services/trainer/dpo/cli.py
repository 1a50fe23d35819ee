"""`rlhf train dpo`: DPO / IPO on preference pairs into a LoRA adapter; prints the adapter folder,
and with --push-to pushes it to the policy replicas.

Data parallel: `torchrun --nproc-per-node N -m rlhf.cli train dpo ...` (gloo on CPU, NCCL with one
GPU per rank); `--batch-size` stays the global batch.
"""

from __future__ import annotations

from pathlib import Path

import click

from rlhf.plumbing.config import ConfigError
from services.trainer.dpo.settings import DPOSettings
from services.trainer.settings import LORA_TARGET_MODULES, option, split_target_modules


def _option(name: str, *decls: str, **kwargs):
    return option(DPOSettings, name, *decls, **kwargs)


@click.command("dpo")
@_option("data", type=click.Path(dir_okay=False, path_type=Path))
@_option("out", type=click.Path(file_okay=False, path_type=Path))
@_option("model", type=click.Path(file_okay=False, path_type=Path), show_default=False)
@_option("init_adapter", type=click.Path(file_okay=False, path_type=Path))
@_option("loss")
@_option("beta")
@_option("label_smoothing")
@_option("val_file", type=click.Path(dir_okay=False, path_type=Path))
@_option("val_fraction")
@_option("eval_every")
@_option("epochs")
@_option("lr")
@_option("batch_size")
@_option("max_length")
@_option("lora_r")
@_option("lora_alpha")
@_option("target_modules", default=(), callback=split_target_modules,
         help=f"{DPOSettings.model_fields['target_modules'].description} "
              f"[default: {','.join(LORA_TARGET_MODULES)}]")
@_option("seed")
@_option("report_to")
@_option("device")
@_option("progress")
@_option("push_to")
@_option("adapter_name")
@_option("base_model_id")
@_option("admin_token", envvar="RLHF_POLICY_ADMIN_TOKEN")
@_option("admin_token_file", type=click.Path(dir_okay=False, path_type=Path))
@_option("push_timeout_seconds")
def train_dpo(**flags) -> None:
    """DPO (or IPO) on preference pairs: writes a peft adapter folder, the policy model with a
    LoRA that prefers the chosen answers; --push-to serves it on the policy.

    Progress goes to stderr and only the adapter folder to stdout.
    """
    import asyncio

    from rlhf.clients.errors import CallFailed
    from services.trainer.distributed import backend_for, process_group
    from services.trainer.dpo.push import push_adapter_folder
    from services.trainer.dpo.train import run_dpo
    from services.trainer.errors import DataError, TrainError

    flags["push_to"] = list(flags["push_to"])
    try:
        settings = DPOSettings.load(None, **flags)
        backend = backend_for(settings.device)
    except ConfigError as exc:  # e.g. --report-to naming a package not installed
        raise click.UsageError(str(exc)) from None
    with process_group(backend) as ranks:
        try:
            folder = run_dpo(settings)
        except (DataError, TrainError, ConfigError) as exc:
            raise click.ClickException(str(exc)) from None
    if not ranks.is_main:
        return
    if settings.push_to:
        try:
            result = asyncio.run(push_adapter_folder(settings, folder))
        except (CallFailed, ConfigError) as exc:
            raise click.ClickException(f"the adapter is in {folder}, but the push failed: "
                                       f"{exc}") from None
        click.echo(f"dpo: pushed {settings.adapter_name} v{result.version} to "
                   f"{', '.join(result.confirmed)}", err=True)
    click.echo(str(folder))
