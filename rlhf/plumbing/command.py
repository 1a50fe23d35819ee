"""The command that starts a service: `rlhf serve <name>` and `python -m services.<name>`.

Options come from the service's config class, one per scalar or list field (`--max-n`, `--scorer`
repeatable), so a new config field is a new flag with no extra code. `--port` is the gRPC port,
`--config` a YAML file. Flags beat environment variables, which beat the file.
"""

from __future__ import annotations

import asyncio
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import click
from pydantic import BaseModel

from rlhf.plumbing.config import ConfigError, ConfigT, ServiceConfig, Settings
from rlhf.plumbing.errors import ServiceError
from rlhf.plumbing.logs import setup_logging
from rlhf.plumbing.server import ServiceApp, run_until_signalled

# Fields whose flag has a shorter or conventional name.
_FLAG_NAMES = {"grpc_port": "--port", "http_port": "--port"}


def _click_type(annotation) -> tuple[object, bool] | None:
    """(click type, multiple) for a config field, or None when it has no flag (nested models)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _click_type(args[0]) if len(args) == 1 else None
    if origin is typing.Annotated:
        return _click_type(args[0])
    if origin in (list, tuple):
        inner = _click_type(args[0]) if args else (str, False)
        return (inner[0], True) if inner else None
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return None
    if annotation is bool:
        return bool, False
    if annotation in (int, float, str):
        return annotation, False
    if annotation is Path:
        return click.Path(path_type=Path), False
    return str, False


def config_options(config_cls: type[Settings]) -> tuple[list[click.Parameter], list[str]]:
    """Click options for a config class: `--config FILE` and one flag per scalar or list field.
    Returns the options and the field names they set."""
    params: list[click.Parameter] = [
        click.Option(["--config", "config_file"], type=click.Path(path_type=Path),
                     help="YAML file of config keys (see docs); flags and env override it."),
    ]
    fields: list[str] = []
    for name, field in config_cls.model_fields.items():
        kind = _click_type(field.annotation)
        if kind is None:
            continue
        ctype, multiple = kind
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        env = config_cls.env_prefix() + name.upper()
        help_text = (field.description or "") + f" [env {env}]"
        if ctype is bool:
            decls = [f"{flag}/--no-{flag[2:]}", name]
            params.append(click.Option(decls, default=None, help=help_text))
        else:
            params.append(click.Option([flag, name], type=ctype, multiple=multiple,
                                       default=None, help=help_text))
        fields.append(name)
    return params, fields


def config_from_flags(config_cls: type[ConfigT], config_file: Path | None, fields: list[str],
                      values: dict) -> ConfigT:
    """The config from `--config`, the environment and the flags that were given; a bad key or
    value is a usage error (exit 2) naming it."""
    overrides = {}
    for name in fields:
        value = values.get(name)
        if isinstance(value, tuple):
            value = list(value) or None
        overrides[name] = value
    try:
        return config_cls.load(config_file, **overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def service_command(
    config_cls: type[ServiceConfig], build_app: Callable[[ServiceConfig], ServiceApp]
) -> click.Command:
    params, fields = config_options(config_cls)

    def callback(config_file: Path | None, **values):
        config = config_from_flags(config_cls, config_file, fields, values)
        setup_logging(config.log_level, config.log_format)
        try:
            app = build_app(config)
            asyncio.run(run_until_signalled(config, app))
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except (ServiceError, OSError) as exc:
            # Start-up failures (no model, port taken) end with their message, not a traceback.
            click.echo(f"error: {config.service} failed to start: {exc}", err=True)
            sys.exit(1)

    return click.Command(
        config_cls.service, params=params, callback=callback,
        help=f"Start the {config_cls.service} service (gRPC, health, metrics).",
    )
