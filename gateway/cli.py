"""`rlhf serve gateway` / `python -m gateway`: the HTTP gateway under uvicorn.

Prints `READY gateway http=PORT` once it accepts connections (the line `rlhf up` and tests wait
for); SIGTERM / Ctrl-C stop accepting, let in-flight requests finish, then close the channels."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from gateway.config import GatewayConfig
from rlhf.plumbing.command import config_from_flags, config_options
from rlhf.plumbing.logs import setup_logging


async def serve(config: GatewayConfig, graceful_seconds: float = 30.0) -> None:
    import uvicorn

    from gateway.app import create_app

    server = uvicorn.Server(uvicorn.Config(
        create_app(config), host=config.host, port=config.http_port, log_config=None,
        access_log=False, timeout_graceful_shutdown=graceful_seconds, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task  # start-up failed (port taken, lifespan error): re-raise
            raise OSError("the gateway stopped during start-up")
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"READY gateway http={port}", flush=True)
    await task


_params, _fields = config_options(GatewayConfig)


def _run(config_file: Path | None, **values) -> None:
    config = config_from_flags(GatewayConfig, config_file, _fields, values)
    setup_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        click.echo(f"error: gateway failed to start: {exc}", err=True)
        sys.exit(1)


command = click.Command(
    "gateway", params=_params, callback=_run,
    help="Start the HTTP gateway: best-of-n, OpenAI-compatible endpoints, feedback, web page.")
