"""`rlhf loop rm`: the reward-model loop, once (`--once`, e.g. a Kubernetes CronJob) or as a
service that looks for new pairs every `--poll-seconds`.

Exit status of `--once`: 0 when a version was pushed or there was nothing to do, 3 when the new
model was refused by the safety checks (nothing pushed), 1 on an error (gateway unreachable or
refusing the admin key, reward service refusing the version, bad data)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from rlhf.plumbing.config import ConfigError
from services.trainer.loop.settings import LoopSettings
from services.trainer.settings import option

REFUSED_EXIT = 3


def _flag(name: str, *decls: str, **kwargs):
    return option(LoopSettings, name, *decls, overlay=True, **kwargs)


@click.group("loop")
def loop() -> None:
    """Closed loops: users' feedback back into the models."""


@loop.command("rm")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML of the settings (keys as the flags, with underscores); flags override.")
@click.option("--once", is_flag=True, help="Run one round and exit (for a CronJob).")
@_flag("gateway_url")
@_flag("admin_key", envvar="RLHF_LOOP_ADMIN_KEY",
       help="Gateway admin key (prefer the RLHF_LOOP_ADMIN_KEY environment variable).")
@click.option("--admin-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the gateway admin key.")
@_flag("reward_addr")
@_flag("reward_token", envvar="RLHF_LOOP_REWARD_TOKEN",
       help="Reward admin token (prefer the RLHF_LOOP_REWARD_TOKEN environment variable).")
@click.option("--reward-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the reward service's admin token.")
@_flag("folder", type=click.Path(file_okay=False, path_type=Path))
@_flag("init_model", type=click.Path(file_okay=False, path_type=Path))
@_flag("seed_heldout", type=click.Path(dir_okay=False, path_type=Path))
@_flag("every_new_pairs")
@_flag("poll_seconds")
@_flag("heldout_fraction")
@_flag("max_accuracy_drop")
@_flag("min_new_accuracy")
@_flag("version_prefix")
@_flag("backbone")
@_flag("merge")
@_flag("epochs")
@_flag("batch_size")
@_flag("lr")
@_flag("max_length")
@_flag("seed")
@_flag("device")
@_flag("threads")
def loop_rm(config_file, once, admin_key_file, reward_token_file, **flags) -> None:
    """Retrain the reward model on new preference pairs from the gateway and swap it in."""
    from services.trainer.loop.export import LoopError
    from services.trainer.loop.rm_loop import RewardModelLoop

    flags["reward_addr"] = list(flags["reward_addr"]) or None
    try:
        if admin_key_file is not None:
            flags["admin_key"] = _secret(admin_key_file)
        if reward_token_file is not None:
            flags["reward_token"] = _secret(reward_token_file)
        settings = LoopSettings.load(config_file, **flags)
    except (ConfigError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    runner = RewardModelLoop(settings, echo=lambda m: click.echo(m, err=True))
    if not once:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        click.echo(f"loop: every {settings.poll_seconds:g}s, a round per "
                   f"{settings.every_new_pairs} new pairs", err=True)
        runner.serve(stop)
        return
    try:
        result = runner.run_round()
    except LoopError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(result.message, err=True)
    if result.outcome == "refused":
        sys.exit(REFUSED_EXIT)


def _secret(path: Path) -> str:
    value = Path(path).read_text().strip()
    if not value:
        raise ConfigError(f"{path} is empty")
    return value
