"""`rlhf up`: policy, reward, trainer and gateway as local processes, health-checked, stopped
together.

Each service runs as `python -m services.<name>` (or `python -m gateway`) in a session of its own,
so its whole process group can be stopped at once: vLLM's engine core is a child process that
outlives a SIGKILLed parent, and a supervisor that only kills the pid it started leaves it behind.
Stopping sends SIGTERM to the service (it drains), waits `stop_timeout`, then SIGKILLs the group
and waits until no process of the group is left.

Start-up: every service starts at once on free ports of 127.0.0.1 (unless given), writes stdout
and stderr to `<run_dir>/logs/<name>.log`, and counts as up once it printed its `READY` line and
answers a health check (gRPC health SERVING; the gateway's /readyz 200, which needs policy and
reward). A service that exits or misses `start_timeout` stops the rest and shows the end of its log.
Afterwards a service that dies is restarted on the same ports (up to `max_restarts` times), so
one crash does not end the stack. `<run_dir>/stack.json` always says what runs where.

The same `Stack` runs under `rlhf demo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import click

KINDS = ("policy", "reward", "trainer", "gateway")
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
LOG_TAIL_LINES = 25


class ServiceFailed(RuntimeError):
    """A service did not come up, or died and can't be restarted; `name` and the end of its log
    say why."""

    def __init__(self, name: str, reason: str, log_tail: str):
        super().__init__(f"{name} {reason}")
        self.name, self.reason, self.log_tail = name, reason, log_tail


# --------------------------------------------------------------------------- the plan


@dataclass
class Service:
    """One process of the stack and what is known about it."""

    name: str  # "policy" or "policy-0", "policy-1", ..., "reward", "trainer", "gateway"
    kind: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    host: str
    port: int  # gRPC port, or the gateway's HTTP port
    metrics_port: int | None = None  # gRPC services only; the gateway serves /metrics itself
    popen: subprocess.Popen | None = None
    # pending, starting, ready, down (exited, restart due or held), restarting, stopping,
    # stopped, failed
    state: str = "pending"
    restarts: int = 0
    started_at: float = 0.0
    log_offset: int = 0  # where this start's output begins in the (appended) log file
    ready_seconds: float | None = None
    last_exit: str = ""

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def describe(self) -> dict:
        out = {"kind": self.kind, "state": self.state, "pid": self.pid, "port": self.port,
               "log": str(self.log), "restarts": self.restarts, "last_exit": self.last_exit}
        if self.kind == "policy":
            out["ipc_dir"] = self.env.get("VLLM_RPC_BASE_PATH")
        if self.kind == "gateway":
            out.update(url=self.url, metrics=f"{self.url}/metrics")
        else:
            out.update(addr=self.addr, metrics=(f"http://{self.host}:{self.metrics_port}/metrics"
                                                if self.metrics_port else None))
        return out


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


def read_stack_config(path: Path | None) -> dict[str, dict]:
    """The stack YAML: `{policy: {...}, reward: {...}, trainer: {...}, gateway: {...}}`, each
    section the keys of that service's own config file."""
    if path is None:
        return {}
    from rlhf.plumbing.config import ConfigError, read_yaml_mapping

    data = read_yaml_mapping(path, "stack config")
    for key, section in data.items():
        if key not in KINDS:
            raise ConfigError(f"stack config {path}: unknown section {key!r}; "
                              f"sections: {', '.join(KINDS)}")
        if not isinstance(section, dict):
            raise ConfigError(f"stack config {path}: section {key!r} must be a mapping of keys")
    return data


def plan_stack(opts: UpOptions) -> list[Service]:
    """The processes to start, with their ports, flags, environment and log files."""
    import yaml

    from rlhf.paths import default_model_dir

    run_dir = opts.run_dir.resolve()
    for sub in ("logs", "config", "data"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    sections = read_stack_config(opts.config)
    for kind, keys in opts.overrides.items():
        sections[kind] = {**sections.get(kind, {}), **keys}
    model = (opts.model or Path(sections.get("policy", {}).get("model") or default_model_dir()))
    model = Path(model).expanduser().resolve()
    if not (model / "config.json").exists():
        hint = " (run `rlhf model prepare`)" if opts.model is None else ""
        raise click.UsageError(f"model folder {model} not found or has no config.json{hint}")

    # The policy's admin token: pushes come only from this stack's trainer.
    token_file = run_dir / "admin-token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(24))
        token_file.chmod(0o600)
    token = token_file.read_text().strip()

    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                **opts.extra_env}
    taken: set[int] = set()
    host = opts.host

    def config_flag(kind: str) -> list[str]:
        if not sections.get(kind):
            return []
        path = run_dir / "config" / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(sections[kind], sort_keys=False))
        return ["--config", str(path)]

    def grpc_service(name: str, kind: str, flags: list[str], env: dict | None = None) -> Service:
        port, mport = free_port(host, taken), free_port(host, taken)
        argv = [sys.executable, "-m", f"services.{kind}", "--host", host, "--port", str(port),
                "--metrics-port", str(mport), "--data-dir", str(run_dir / "data" / name),
                "--drain-grace-seconds", str(opts.drain_grace), *config_flag(kind), *flags]
        return Service(name, kind, argv, {**base_env, **(env or {})},
                       run_dir / "logs" / f"{name}.log", host, port, mport)

    services: list[Service] = []
    replicas = max(1, opts.policy_replicas)
    # vLLM's IPC sockets need a short path (a Unix socket path has at most 107 bytes), so they
    # go under /tmp rather than the run dir; Stack.stop() removes the folder.
    ipc_root = Path(tempfile.mkdtemp(prefix="rlhf-up-"))
    for i in range(replicas):
        name = "policy" if replicas == 1 else f"policy-{i}"
        # Each replica has its own data dir (adapter store) and vLLM IPC dir.
        rpc = ipc_root / name
        rpc.mkdir()
        services.append(grpc_service(name, "policy", ["--model", str(model)],
                                     {"RLHF_POLICY_ADMIN_TOKEN": token,
                                      "VLLM_RPC_BASE_PATH": str(rpc)}))
    policy_addrs = [s.addr for s in services]

    scorers = list(opts.scorers)
    if not scorers and not sections.get("reward", {}).get("scorer"):
        scorers = list(DEFAULT_SCORERS)
    reward = grpc_service("reward", "reward", [f"--scorer={s}" for s in scorers])
    services.append(reward)

    if "trainer" not in opts.skip:
        prompts = opts.prompts
        if prompts is None and not sections.get("trainer", {}).get("prompts"):
            prompts = run_dir / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEFAULT_PROMPTS))
        flags = ["--model", str(model), "--reward-addr", reward.addr]
        flags += [f for addr in policy_addrs for f in ("--policy-addr", addr)]
        if prompts is not None:
            flags += ["--prompts", str(Path(prompts).resolve())]
        services.append(grpc_service("trainer", "trainer", flags,
                                     {"RLHF_TRAINER_POLICY_ADMIN_TOKEN": token}))

    if "gateway" not in opts.skip:
        port = opts.gateway_port or free_port(host, taken)
        argv = [sys.executable, "-m", "gateway", "--host", host, "--port", str(port),
                "--data-dir", str(run_dir / "data" / "gateway"), "--reward-addr", reward.addr,
                *config_flag("gateway")]
        argv += [f for addr in policy_addrs for f in ("--policy-addr", addr)]
        services.append(Service("gateway", "gateway", argv, dict(base_env),
                                run_dir / "logs" / "gateway.log", host, port))
    return services


# --------------------------------------------------------------------------- process groups


def _parent_death_signal() -> None:
    """In the child before exec: its own session (so its group can be killed as one), and
    SIGTERM when the supervisor dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    os.setsid()
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM, 0, 0, 0)


try:  # looked up before any fork: the child only calls it
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists (zombies not counted)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_pgid_of(pid) == pgid and not _is_zombie(pid) for pid in _all_pids())


def _all_pids() -> Iterable[int]:
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                yield int(entry)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "


def _pgid_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _last_line(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(offset, size - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- health


async def grpc_serving(addr: str, timeout: float = 3.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(addr) as channel:
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


async def http_ok(url: str, timeout: float = 3.0) -> bool:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- the stack


class Stack:
    """Starts, watches and stops the planned services. Use as `async with Stack(...) as stack:`
    (start on enter, stop on exit) or call start()/supervise()/stop() yourself."""

    def __init__(self, services: list[Service], run_dir: Path, opts: UpOptions, console=None):
        from rich.console import Console

        self.services = services
        self.by_name = {s.name: s for s in services}
        self.run_dir = run_dir
        self.opts = opts
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.state = "starting"
        self.started = time.monotonic()
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._restarting: set[asyncio.Future] = set()
        self._fatal: ServiceFailed | None = None

    # -- public

    def of_kind(self, kind: str) -> list[Service]:
        return [s for s in self.services if s.kind == kind]

    @property
    def gateway_url(self) -> str | None:
        gw = self.of_kind("gateway")
        return gw[0].url if gw else None

    async def __aenter__(self) -> Stack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Starts everything and returns once every service is healthy; raises ServiceFailed
        (the caller stops the stack)."""
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.fields[name]:<10}"), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, transient=True,
            disable=not self.console.is_terminal,
        )
        self._progress.start()
        try:
            for svc in self.services:
                self._tasks[svc.name] = self._progress.add_task("", total=1, name=svc.name,
                                                                status="starting")
                self._launch(svc)
            self._write_state()
            waits = [asyncio.ensure_future(self._wait_ready(s)) for s in self.services]
            try:
                for fut in asyncio.as_completed(waits):
                    await fut
            finally:
                for w in waits:
                    w.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
        finally:
            self._progress.stop()
        self.state = "ready"
        self._write_state()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: restarts services that die (on the same ports). Raises
        ServiceFailed when one can't be brought back. While `<run_dir>/hold/<name>` exists, a
        dead service stays down (maintenance, fault drills); removing the file restarts it."""
        while not stop.is_set():
            if self._fatal is not None:
                raise self._fatal
            for svc in self.services:
                if svc.state == "ready" and svc.popen.poll() is not None:
                    await self._on_exit(svc)
                if svc.state == "down" and not self.hold_file(svc.name).exists():
                    self._restart(svc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.3)

    def hold_file(self, name: str) -> Path:
        return self.run_dir / "hold" / name

    async def stop(self) -> None:
        """Stops everything: consumers (gateway, trainer) first, then policy and reward. Each
        gets SIGTERM, then its whole process group SIGKILL after stop_timeout."""
        if self.state == "stopped":
            return
        self.state = "stopping"
        self._write_state()
        for task in self._restarting:
            task.cancel()
        first = [s for s in self.services if s.kind in ("gateway", "trainer")]
        rest = [s for s in self.services if s not in first]
        for group in (first, rest):
            await asyncio.gather(*(self._stop_one(s) for s in group))
        for svc in self.of_kind("policy"):  # vLLM's IPC socket folders
            ipc = Path(svc.env.get("VLLM_RPC_BASE_PATH", ""))
            if ipc.name == svc.name and ipc.parent.name.startswith("rlhf-up-"):
                shutil.rmtree(ipc.parent, ignore_errors=True)
        self.state = "stopped"
        self._write_state()

    def urls_text(self) -> str:
        lines = []
        for s in self.services:
            if s.kind == "gateway":
                lines.append(f"  {s.name:<10} {s.url}  (OpenAI base URL {s.url}/v1, "
                             f"metrics {s.url}/metrics)")
            else:
                lines.append(f"  {s.name:<10} {s.addr}  (gRPC; metrics "
                             f"http://{s.host}:{s.metrics_port}/metrics)")
        return "\n".join(lines)

    # -- internals

    def _say(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def _status(self, svc: Service, status: str, done: bool = False) -> None:
        if self._progress is not None and svc.name in self._tasks:
            self._progress.update(self._tasks[svc.name], status=status,
                                  completed=1 if done else 0)

    def _launch(self, svc: Service) -> None:
        svc.log.parent.mkdir(parents=True, exist_ok=True)
        with open(svc.log, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== rlhf up: starting {svc.name} at {stamp}"
                      f"{f' (restart {svc.restarts})' if svc.restarts else ''} ===\n".encode())
            log.flush()
            svc.log_offset = log.tell()
            svc.popen = subprocess.Popen(
                svc.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=svc.env, cwd=os.getcwd(), preexec_fn=_parent_death_signal,
            )
        svc.state = "starting"
        svc.started_at = time.monotonic()

    async def _wait_ready(self, svc: Service) -> None:
        """READY line in the log, then a health check that passes."""
        from rich.markup import escape

        marker = f"READY {svc.kind}"
        deadline = svc.started_at + self.opts.start_timeout
        seen_ready = False
        while True:
            code = svc.popen.poll()
            if code is not None:
                svc.state = "failed"
                svc.last_exit = _exit_text(code)
                self._status(svc, f"[red]exited ({svc.last_exit})")
                raise ServiceFailed(svc.name, f"failed to start: exited ({svc.last_exit})",
                                    log_tail(svc.log))
            if time.monotonic() > deadline:
                svc.state = "failed"
                raise ServiceFailed(svc.name, "failed to start: not healthy after "
                                    f"{self.opts.start_timeout:.0f}s", log_tail(svc.log))
            if not seen_ready:
                seen_ready = _log_has(svc.log, svc.log_offset, marker)
                self._status(svc, escape(_last_line(svc.log, svc.log_offset)[:70]))
            if seen_ready:
                healthy = (await http_ok(f"{svc.url}/readyz") if svc.kind == "gateway"
                           else await grpc_serving(svc.addr))
                if healthy:
                    break
                self._status(svc, "waiting for its health check")
            await asyncio.sleep(0.25)
        svc.state = "ready"
        svc.ready_seconds = time.monotonic() - svc.started_at
        self._status(svc, "[green]ready", done=True)
        self._say(f"[green]✓[/green] {svc.name:<10} ready in {svc.ready_seconds:5.1f}s  "
                  f"pid {svc.pid}  log {svc.log}")
        self._write_state()

    async def _on_exit(self, svc: Service) -> None:
        svc.last_exit = _exit_text(svc.popen.poll())
        await self._reap_group(svc)
        if not self.opts.restart or svc.restarts >= self.opts.max_restarts:
            svc.state = "failed"
            self._write_state()
            why = "restarts are off" if not self.opts.restart else (
                f"it already restarted {svc.restarts} times")
            raise ServiceFailed(svc.name, f"exited ({svc.last_exit}) and {why}",
                                log_tail(svc.log))
        svc.state = "down"
        held = self.hold_file(svc.name).exists()
        self._say(f"[yellow]![/yellow] {svc.name} exited ({svc.last_exit}); "
                  + (f"held down until {self.hold_file(svc.name)} is removed" if held else
                     f"restarting it ({svc.restarts + 1}/{self.opts.max_restarts})"))
        self._write_state()

    def _restart(self, svc: Service) -> None:
        svc.restarts += 1
        self._launch(svc)
        svc.state = "restarting"
        self._status(svc, "restarting")
        self._write_state()
        task = asyncio.ensure_future(self._wait_restarted(svc))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _wait_restarted(self, svc: Service) -> None:
        try:
            await self._wait_ready(svc)
        except ServiceFailed as exc:
            self._fatal = exc  # supervise() raises it: the stack stops

    async def _stop_one(self, svc: Service) -> None:
        if svc.popen is None:
            svc.state = "stopped"
            return
        # A service still starting has nothing to drain: it gets a short grace only.
        timeout = self.opts.stop_timeout if svc.state == "ready" else min(
            3.0, self.opts.stop_timeout)
        svc.state = "stopping"
        if svc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                svc.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while svc.popen.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if svc.popen.poll() is None:
                self._say(f"[yellow]![/yellow] {svc.name} did not stop in {timeout:.0f}s; "
                          "killing its process group")
        await self._reap_group(svc)
        svc.state = "stopped"
        self._write_state()

    async def _reap_group(self, svc: Service) -> None:
        """SIGKILL whatever is left of the service's process group and wait until it is gone."""
        pgid = svc.popen.pid  # a session leader: its pid is the group id
        kill_group(pgid)
        deadline = time.monotonic() + 15
        while (svc.popen.poll() is None or group_alive(pgid)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            kill_group(pgid)
        if group_alive(pgid):
            self._say(f"[red]✗[/red] processes of {svc.name}'s group {pgid} survived SIGKILL")

    def _write_state(self) -> None:
        gw = self.of_kind("gateway")
        data = {
            "state": self.state, "run_dir": str(self.run_dir), "supervisor_pid": os.getpid(),
            "gateway_url": gw[0].url if gw else None,
            "policy_addrs": [s.addr for s in self.of_kind("policy")],
            "reward_addrs": [s.addr for s in self.of_kind("reward")],
            "trainer_addr": next((s.addr for s in self.of_kind("trainer")), None),
            "services": {s.name: s.describe() for s in self.services},
        }
        path = self.run_dir / "stack.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _log_has(path: Path, offset: int, marker: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return marker.encode() in f.read()
    except OSError:
        return False


def default_run_dir(kind: str = "up") -> Path:
    from rlhf.paths import rlhf_home

    return rlhf_home() / "stacks" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------- the command


async def run_up(opts: UpOptions, console) -> int:
    services = plan_stack(opts)
    stack = Stack(services, opts.run_dir.resolve(), opts, console)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    console.print(f"Starting {', '.join(s.name for s in services)}; logs in "
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
                      f"(stack.json, logs/, admin-token)\n", highlight=False)
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


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
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

    opts = UpOptions(
        run_dir=run_dir or default_run_dir("up"), model=model, policy_replicas=policy_replicas,
        scorers=list(scorers), prompts=prompts, host=host, gateway_port=gateway_port,
        config=config, skip=list(skip), start_timeout=start_timeout, stop_timeout=stop_timeout,
        restart=restart, max_restarts=max_restarts, extra_env=_parse_env(env),
    )
    try:
        code = asyncio.run(run_up(opts, Console(stderr=True, soft_wrap=True)))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(code)
