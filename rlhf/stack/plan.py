"""The plan of a local stack: which processes `rlhf up` starts, on which ports, with which flags,
environment, log file and per-service config. Pure: it reads and writes nothing and starts
nothing; `rlhf.stack.rundir` does the I/O around it (stack.yaml, model check, admin tokens, the
files the plan lists).

Each service gets its section of stack.yaml as its own `--config` file. The keys the stack owns
(host, ports, data dir, drain grace, model, peer addresses) are flags, which beat the file: a
section cannot move a service off its planned port or away from the stack's peers.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf.plumbing.config import ConfigError

KINDS = ("policy", "reward", "trainer", "gateway")
# The config keys with the addresses of the peers each kind needs: a plan that cannot fill one
# is an error naming it, never a service that waits for a peer it was not told about.
PEERS: dict[str, tuple[str, ...]] = {
    "trainer": ("policy_addr", "reward_addr"),
    "gateway": ("policy_addr", "reward_addr"),
}
# Scorers when neither --scorer nor the stack file names any: prefer answers of about 40 words
# and punish loops, so best-of-n by hand has something visible to rank on.
DEFAULT_SCORERS = ("rule:length?target=40&unit=words", "0.5*rule:repetition")
# Prompts the trainer uses for runs that name none (the demo's task: short movie reviews).
DEFAULT_PROMPTS = (
    "Write one sentence of a movie review.",
    "Write a short review of a film you watched recently.",
    "In one sentence, what did you think of the movie?",
    "Describe the last movie you saw in a few words.",
    "Give a one-line review of a comedy.",
    "Write a one-sentence review of a science fiction film.",
    "Summarise your opinion of a drama film in one sentence.",
    "Write one sentence about the acting in a movie.",
    "Review an animated movie in one sentence.",
    "Write a brief review of a thriller.",
    "What would you tell a friend about the film you saw yesterday?",
    "Write one sentence about a movie's soundtrack.",
    "Give your verdict on a documentary in one sentence.",
    "Write a one-line review of a romantic film.",
    "Describe a movie's plot and your opinion of it in one sentence.",
    "Write one sentence of a review of a horror film.",
)


class PlanError(ConfigError):
    """The stack cannot be planned as asked; the message says what to change."""


@dataclass
class UpOptions:
    """What `rlhf up` starts; every field is a flag of the command."""

    run_dir: Path
    model: Path | None = None  # default: the prepared SmolLM2
    policy_replicas: int = 1
    scorers: list[str] = field(default_factory=list)
    prompts: Path | None = None
    host: str = "127.0.0.1"
    gateway_port: int = 0  # 0: a free port
    config: Path | None = None  # stack YAML: a section of service config keys per kind
    overrides: dict[str, dict] = field(default_factory=dict)  # sections merged over the file's
    skip: list[str] = field(default_factory=list)  # kinds not to start (trainer, gateway)
    start_timeout: float = 600.0  # vLLM on a busy 2-core machine can take minutes
    stop_timeout: float = 20.0  # SIGTERM -> SIGKILL of the whole group
    drain_grace: float = 5.0  # in-flight calls get this long when a gRPC service stops
    restart: bool = True
    max_restarts: int = 3
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceSpec:
    """One process of the stack as planned."""

    name: str  # "policy" or "policy-0", "policy-1", ..., "reward", "trainer", "gateway"
    kind: str
    argv: tuple[str, ...]
    env: Mapping[str, str]  # set over the supervisor's own environment
    log: Path
    host: str
    port: int  # gRPC port, or the gateway's HTTP port
    metrics_port: int | None = None  # gRPC services only; the gateway serves /metrics itself
    ipc_dir: Path | None = None  # policy: vLLM's IPC socket folder

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class StackPlan:
    run_dir: Path
    services: tuple[ServiceSpec, ...]
    files: Mapping[Path, str]  # written before anything starts: config sections, prompts
    dirs: tuple[Path, ...]  # created before anything starts
    ipc_root: Path  # parent of every policy's IPC folder; removed when the stack stops

    def of_kind(self, kind: str) -> list[ServiceSpec]:
        return [s for s in self.services if s.kind == kind]


def merge_sections(*layers: Mapping[str, Mapping]) -> dict[str, dict]:
    """Per-kind config sections, each later layer's keys over the earlier ones'."""
    out: dict[str, dict] = {}
    for layer in layers:
        for kind, keys in layer.items():
            out[kind] = {**out.get(kind, {}), **keys}
    return out


def check_sections(sections: Mapping, source: str) -> dict[str, dict]:
    """A stack config: a mapping of kind -> mapping of that service's config keys."""
    for key, section in sections.items():
        if key not in KINDS:
            raise ConfigError(f"stack config {source}: unknown section {key!r}; "
                            f"sections: {', '.join(KINDS)}")
        if not isinstance(section, dict):
            raise ConfigError(f"stack config {source}: section {key!r} must be a mapping of keys")
    return dict(sections)


def planned_model(opts: UpOptions, sections: Mapping[str, Mapping], default: Path) -> Path:
    """The base model folder: --model, else the policy section's `model`, else `default`."""
    return Path(opts.model or sections.get("policy", {}).get("model") or default)


def peer_flags(kind: str, peers: Mapping[str, list[str]]) -> list[str]:
    """The flags that give a `kind` service its peers' addresses; PlanError naming the key when
    the plan has none for a peer that kind needs."""
    flags: list[str] = []
    for key in PEERS.get(kind, ()):
        addrs = peers.get(key) or []
        if not addrs:
            raise PlanError(f"the {kind} needs {key} (the address of a {key.split('_')[0]} "
                            "service) and this stack has none to give it")
        flags += [f for addr in addrs for f in (f"--{key.replace('_', '-')}", addr)]
    return flags


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A port nothing listens on now (the OS picks it); `taken` avoids handing one out twice."""
    taken = taken if taken is not None else set()
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def build_plan(opts: UpOptions, sections: Mapping[str, Mapping], model: Path, token: str,
               ipc_root: Path, port: Callable[[], int] | None = None,
               python: str = sys.executable, trainer_token: str = "") -> StackPlan:
    """The processes to start and the files and folders they need. `sections` is the merged
    stack config, `token` the policy's admin token, `trainer_token` the trainer's (needed when
    the plan has a trainer), `port()` hands out free ports."""
    if port is None:
        taken: set[int] = set()

        def port() -> int:
            return free_port(opts.host, taken)

    run_dir, host = opts.run_dir, opts.host
    files: dict[Path, str] = {}
    dirs = [run_dir / "logs", run_dir / "config", run_dir / "data"]
    base_env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **opts.extra_env}

    def config_flag(kind: str) -> list[str]:
        if not sections.get(kind):
            return []
        path = run_dir / "config" / f"{kind}.yaml"
        files[path] = yaml.safe_dump(dict(sections[kind]), sort_keys=False)
        return ["--config", str(path)]

    def grpc_service(name: str, kind: str, flags: list[str], env: dict | None = None,
                     ipc_dir: Path | None = None) -> ServiceSpec:
        grpc_port, metrics_port = port(), port()
        argv = [python, "-m", f"services.{kind}", "--host", host, "--port", str(grpc_port),
                "--metrics-port", str(metrics_port), "--data-dir", str(run_dir / "data" / name),
                "--drain-grace-seconds", str(opts.drain_grace), *config_flag(kind), *flags]
        return ServiceSpec(name, kind, tuple(argv), {**base_env, **(env or {})},
                            run_dir / "logs" / f"{name}.log", host, grpc_port, metrics_port,
                            ipc_dir)

    services: list[ServiceSpec] = []
    replicas = max(1, opts.policy_replicas)
    for i in range(replicas):
        name = "policy" if replicas == 1 else f"policy-{i}"
        # Each replica has its own data dir (adapter store) and vLLM IPC dir.
        rpc = ipc_root / name
        dirs.append(rpc)
        services.append(grpc_service(name, "policy", ["--model", str(model)],
                                     {"RLHF_POLICY_ADMIN_TOKEN": token,
                                      "VLLM_RPC_BASE_PATH": str(rpc)}, rpc))
    peers = {"policy_addr": [s.addr for s in services]}

    scorers = list(opts.scorers)
    if not scorers and not sections.get("reward", {}).get("scorer"):
        scorers = list(DEFAULT_SCORERS)
    reward = grpc_service("reward", "reward", [f"--scorer={s}" for s in scorers])
    services.append(reward)
    peers["reward_addr"] = [reward.addr]

    if "trainer" not in opts.skip:
        prompts = opts.prompts
        if prompts is None and not sections.get("trainer", {}).get("prompts"):
            prompts = run_dir / "prompts.jsonl"
            files[prompts] = "".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS)
        flags = ["--model", str(model), *peer_flags("trainer", peers)]
        if prompts is not None:
            flags += ["--prompts", str(prompts)]
        if not trainer_token:
            raise PlanError("a stack with a trainer needs the trainer's admin token")
        services.append(grpc_service("trainer", "trainer", flags,
                                     {"RLHF_TRAINER_POLICY_ADMIN_TOKEN": token,
                                      "RLHF_TRAINER_ADMIN_TOKEN": trainer_token}))

    if "gateway" not in opts.skip:
        gateway_port = opts.gateway_port or port()
        argv = [python, "-m", "gateway", "--host", host, "--port", str(gateway_port),
                "--data-dir", str(run_dir / "data" / "gateway"), *config_flag("gateway"),
                *peer_flags("gateway", peers)]
        services.append(ServiceSpec("gateway", "gateway", tuple(argv), dict(base_env),
                                    run_dir / "logs" / "gateway.log", host, gateway_port))
    return StackPlan(run_dir, tuple(services), files, tuple(dirs), ipc_root)
