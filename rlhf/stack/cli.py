"""`rlhf up`: policy, reward, trainer and gateway as local processes, health-checked, stopped
together on Ctrl-C or SIGTERM. Every service starts at once on free ports of 127.0.0.1 (unless
given); the addresses are printed once all are ready, and `STACK READY <run_dir>/stack.json` is
the last line of start-up on stdout. A service that fails to start stops the rest, the end of its
log is shown and the exit status is 1."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path

import click

from rlhf.stack.plan import DEFAULT_SCORERS, UpOptions


async def run_up(opts: UpOptions, console) -> int:
    from rlhf.stack.rundir import prepare
    from rlhf.stack.supervisor import ServiceFailed, Stack

    stack = Stack(prepare(opts), opts, console)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    console.print(f"Starting {', '.join(s.name for s in stack.services)}; logs in "
                  f"{stack.run_dir / 'logs'}", highlight=False)
    try:
        starting = asyncio.ensure_future(stack.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            console.print("Interrupted during start-up; stopping.")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServiceFailed):
                await starting
            code = 130
            return code
        stopping.cancel()
        starting.result()
        took = time.monotonic() - stack.started
        console.print(f"\n[bold green]Stack ready[/bold green] in {took:.1f}s:\n"
                      f"{stack.urls_text()}\n  run dir    {stack.run_dir} "
                      f"(stack.json, logs/, admin-token, trainer-token)\n", highlight=False)
        if stack.gateway_url:
            console.print(f"Try: curl -s {stack.gateway_url}/v1/best-of-n -H 'content-type: "
                          "application/json' -d '{\"messages\": [{\"role\": \"user\", "
                          "\"content\": \"Write one sentence of a movie review.\"}], \"n\": 4, "
                          "\"return_candidates\": true}'", highlight=False, soft_wrap=True)
        console.print("Ctrl-C stops everything.", highlight=False)
        print(f"STACK READY {stack.run_dir / 'stack.json'}", flush=True)
        await stack.supervise(stop)
        console.print("Stopping ...")
    except ServiceFailed as exc:
        console.print(f"[red]✗ {exc}[/red]; stopping the rest. "
                      f"Last lines of {stack.by_name[exc.name].log}:", highlight=False)
        console.print(exc.log_tail, highlight=False, markup=False)
        code = 1
    finally:
        await stack.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        console.print("All services stopped.")
    return code


def parse_env(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} must be KEY=VALUE", param_hint="--env")
        out[key] = value
    return out


@click.command("up")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Base model folder for policy and trainer [default: the prepared SmolLM2].")
@click.option("--policy-replicas", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Policy processes; the trainer pushes to all, the gateway balances over all.")
@click.option("--scorer", "scorers", multiple=True,
              help="Reward scorer spec, repeatable (see docs/reward.md) "
                   f"[default: {' + '.join(DEFAULT_SCORERS)}].")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Prompts JSONL for training runs that name none [default: built-in "
                   "movie-review prompts].")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Stack YAML: sections policy/reward/trainer/gateway of service config keys.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Logs, stack.json and service data [default: $RLHF_HOME/stacks/up-<time>].")
@click.option("--gateway-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="The gateway's HTTP port (0: a free one). Other ports are picked free.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--skip", type=click.Choice(["trainer", "gateway"]), multiple=True,
              help="Do not start this service (repeatable).")
@click.option("--start-timeout", type=float, default=600.0, show_default=True,
              help="Seconds each service has to become healthy.")
@click.option("--stop-timeout", type=float, default=20.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL of a service's process group.")
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="Restart a service that dies after start-up (same ports).")
@click.option("--max-restarts", type=click.IntRange(0), default=3, show_default=True)
@click.option("--env", "env", multiple=True, help="KEY=VALUE for every service (repeatable).")
def up(model, policy_replicas, scorers, prompts, config, run_dir, gateway_port, host, skip,
       start_timeout, stop_timeout, restart, max_restarts, env) -> None:
    """Start policy, reward, trainer and gateway on this machine until Ctrl-C or SIGTERM."""
    from rich.console import Console

    from rlhf.plumbing.config import ConfigError
    from rlhf.stack.rundir import default_run_dir

    opts = UpOptions(
        run_dir=run_dir or default_run_dir("up"), model=model, policy_replicas=policy_replicas,
        scorers=list(scorers), prompts=prompts, host=host, gateway_port=gateway_port,
        config=config, skip=list(skip), start_timeout=start_timeout, stop_timeout=stop_timeout,
        restart=restart, max_restarts=max_restarts, extra_env=parse_env(env),
    )
    try:
        code = asyncio.run(run_up(opts, Console(stderr=True, soft_wrap=True)))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(code)
