"""Service configuration: one pydantic-settings class per service.

Sources, highest priority first: explicit values (CLI flags), environment variables
(`RLHF_<SERVICE>_<FIELD>`, nested with `__`, lists comma-separated), a YAML file, defaults.
Unknown keys are errors that name the key, in the YAML file and in the environment alike, so a
typo never silently falls back to a default. The one exception is the variables Kubernetes injects
for a Service of the same name (`RLHF_POLICY_PORT=tcp://...`, `..._SERVICE_HOST`): they are ignored,
and no field is named `port` so they cannot collide.
"""

from __future__ import annotations

import contextvars
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from rlhf.paths import rlhf_home


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the source."""


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# A list that an environment variable gives as "a,b,c" (not JSON).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


def _split_every_item(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [part for item in value for part in _split_commas(item)]
    return _split_commas(value)


# Addresses and keys never contain commas, so every item is split too: `--policy-addr a,b`,
# `--policy-addr a --policy-addr b` and `RLHF_..._POLICY_ADDR=a,b` all mean the same.
AddressList = Annotated[list[str], NoDecode, BeforeValidator(_split_every_item)]


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping; errors name the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys")
    return data


class ServerTLS(BaseModel):
    """TLS for a gRPC server. cert_file + key_file turn TLS on; client_ca_file also requires
    clients to present a certificate signed by that CA (mutual TLS)."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class ClientTLS(BaseModel):
    """TLS for this service's calls to its peers. ca_file turns TLS on; cert_file + key_file
    present a client certificate (mutual TLS)."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # For certificates whose names don't match the address dialled (e.g. an IP in tests).
    server_name_override: str | None = None

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None


_yaml_values: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "_yaml_values", default=None
)


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - not used by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_values.get() or {})


# Names Kubernetes injects for a Service called e.g. "rlhf-policy" (docker-link style variables).
_K8S_LINK = re.compile(r"^(SERVICE_HOST|SERVICE_PORT(_.*)?|PORT(_\d+_(TCP|UDP|SCTP)(_.*)?)?)$")


class Settings(BaseSettings):
    """Loading rules and the fields every process has (gRPC services and the HTTP gateway).
    Subclasses set `service` and the env prefix."""

    model_config = SettingsConfigDict(
        extra="forbid", env_nested_delimiter="__", validate_default=True
    )
    service: ClassVar[str] = "service"

    host: str = Field("127.0.0.1", description="Address the server binds (0.0.0.0 in pods).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    data_dir: Path = Field(default_factory=rlhf_home)
    client_tls: ClientTLS = Field(default_factory=ClientTLS)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @classmethod
    def env_prefix(cls) -> str:
        return cls.model_config.get("env_prefix", "")

    @classmethod
    def load(cls, yaml_file: str | Path | None = None, **overrides: Any):
        """Builds the config from overrides, the environment and `yaml_file`.

        Overrides whose value is None are dropped, so CLI options left unset don't mask the
        environment or the file. Raises ConfigError naming the offending key."""
        data: dict[str, Any] = {}
        source = "defaults"
        if yaml_file is not None:
            source = str(yaml_file)
            data = read_yaml_mapping(yaml_file)
            cls._check_keys(data, source)
        cls._check_env()
        token = _yaml_values.set(data)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(_describe(exc, cls, source)) from None
        finally:
            _yaml_values.reset(token)

    @classmethod
    def _check_keys(cls, data: dict[str, Any], source: str) -> None:
        known = set(cls.model_fields)
        for key in data:
            if key not in known:
                raise ConfigError(
                    f"unknown config key {key!r} in {source}; "
                    f"known keys: {', '.join(sorted(known))}"
                )

    @classmethod
    def _check_env(cls) -> None:
        prefix = cls.env_prefix()
        if not prefix:
            return
        known = {name.upper() for name in cls.model_fields}
        for var in os.environ:
            if not var.startswith(prefix):
                continue
            rest = var[len(prefix) :]
            if rest.split("__", 1)[0] in known or _K8S_LINK.match(rest):
                continue
            raise ConfigError(
                f"unknown environment variable {var}: {cls.__name__} has no field "
                f"{rest.lower()!r}; known: {', '.join(sorted(f.lower() for f in known))}"
            )


class ServiceConfig(Settings):
    """Fields every gRPC service has."""

    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free one."
    )
    metrics_enabled: bool = True
    # Seconds between reporting NOT_SERVING and refusing new calls on SIGTERM, so load balancers
    # and Kubernetes readiness notice before the port stops answering.
    drain_delay_seconds: float = Field(0.0, ge=0)
    # Seconds in-flight calls get to finish after new calls are refused; then they are cancelled.
    drain_grace_seconds: float = Field(30.0, ge=0)
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    tls: ServerTLS = Field(default_factory=ServerTLS)
    # Server bounds (rlhf.plumbing.limits). Larger requests are refused with RESOURCE_EXHAUSTED;
    # 0 means the service's own default (`default_receive_bytes`), sized to its largest RPC.
    max_receive_bytes: int = Field(0, ge=0, description="Largest request message accepted "
                                   "(0: sized to this service's largest RPC).")
    max_concurrent_rpcs: int = Field(256, ge=1, description="Calls served at once; more are "
                                     "refused with RESOURCE_EXHAUSTED (health is exempt).")
    max_streams_per_connection: int = Field(256, ge=1, description="HTTP/2 concurrent streams "
                                            "one client connection may open.")
    # Our clients ping every 30 s while a call runs (rlhf.plumbing.channel): the minimum must
    # stay below that, or the server would close their connections for too many pings.
    keepalive_min_interval_seconds: float = Field(
        20.0, gt=0, description="Pings closer together than this (without data) are strikes.")
    keepalive_permit_without_calls: bool = Field(
        True, description="Accept keepalive pings on a connection with no call running.")
    max_connection_age_seconds: float = Field(
        1800.0, gt=0, description="Connections are closed after this; clients reconnect (and "
        "spread over replicas again).")
    max_connection_age_grace_seconds: float = Field(
        0.0, ge=0, description="Time the calls of an aged connection get to finish (0: as long "
        "as the longest call may run, so an aged connection cuts no call short).")
    max_call_seconds: float = Field(
        900.0, ge=0, description="Longest a unary or client-streaming call may run (0: no bound).")
    max_stream_seconds: float = Field(
        86400.0, ge=0, description="Longest a server-streaming call may run (0: no bound).")
    stream_send_timeout_seconds: float = Field(
        30.0, gt=0, description="A streaming call whose client takes no message for this long "
        "is ended, releasing what it holds.")

    def default_receive_bytes(self) -> int:
        """The receive bound when max_receive_bytes is 0; services size it to their RPCs."""
        return 4 * 1024 * 1024

    def server_limits(self):
        from rlhf.plumbing.limits import ServerLimits

        return ServerLimits(
            max_receive_bytes=self.max_receive_bytes or self.default_receive_bytes(),
            max_send_bytes=self.max_message_bytes,
            max_concurrent_rpcs=self.max_concurrent_rpcs,
            max_streams_per_connection=self.max_streams_per_connection,
            keepalive_min_interval_seconds=self.keepalive_min_interval_seconds,
            keepalive_permit_without_calls=self.keepalive_permit_without_calls,
            max_connection_age_seconds=self.max_connection_age_seconds,
            max_connection_age_grace_seconds=(
                self.max_connection_age_grace_seconds
                or max(self.max_call_seconds, self.max_stream_seconds) or 24 * 3600.0),
            max_call_seconds=self.max_call_seconds,
            max_stream_seconds=self.max_stream_seconds,
            stream_send_timeout_seconds=self.stream_send_timeout_seconds,
        )


def _describe(exc: ValidationError, cls: type[Settings], source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        env = cls.env_prefix() + key.replace(".", "__").upper()
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
        elif "token" in key:  # a secret: the message never repeats the value
            lines.append(f"{key}: {err['msg']} (env {env})")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r}; env {env})")
    return f"invalid {cls.service} configuration (from {source} / environment): " + "; ".join(lines)


ConfigT = TypeVar("ConfigT", bound=Settings)
