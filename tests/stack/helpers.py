"""Helpers for the tests that run `rlhf up` as a real process (test_up.py, test_fault_drill.py):
start it on the tiny model, read its stack.json, find every process it started, talk to the
gateway and the TrainerService, and wait on conditions (never on fixed sleeps)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from rlhf.clients import TrainerClient
from rlhf.v1 import trainer_pb2

# Dense and learnable from a random tiny model.
RULE = "rule:length?target=60&unit=chars"
PROMPTS = ["the cat", "a dog", "hello", "once upon", "red apple", "big sky", "my friend",
           "the end", "blue sea", "good day", "we go", "in the"]
# Small vLLM settings for the tiny model (fp32 and eager are the policy's defaults).
STACK_YAML = """\
policy:
  max_model_len: 512
  max_num_seqs: 32
  default_max_tokens: 16
  keep_versions: 3
  max_loaded_adapters: 6
gateway:
  default_max_tokens: 8
"""


def write_inputs(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = root / "stack.yaml"
    config.write_text(STACK_YAML)
    return prompts, config


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Polls `predicate` (sync or async) until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class UpProcess:
    """A running `rlhf up`, its output in a file."""

    proc: subprocess.Popen
    run_dir: Path
    output: Path

    @classmethod
    def start(cls, run_dir: Path, model: Path, prompts: Path, config: Path, *extra: str):
        run_dir.mkdir(parents=True, exist_ok=True)
        output = run_dir.parent / f"{run_dir.name}.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
        env["RLHF_HOME"] = str(run_dir.parent / "rlhf-home")
        args = [sys.executable, "-m", "rlhf.cli", "up", "--model", str(model), "--prompts",
                str(prompts), "--config", str(config), "--run-dir", str(run_dir),
                "--scorer", RULE, "--stop-timeout", "20", *extra]
        with open(output, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL)
        return cls(proc, run_dir, output)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def state(self) -> dict:
        path = self.run_dir / "stack.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def service(self, name: str) -> dict:
        return self.state()["services"][name]

    async def wait_ready(self, timeout: float = 600) -> dict:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"rlhf up exited {self.proc.returncode}:\n{self.text()}")
            return self.state().get("state") == "ready" and "STACK READY" in self.text()

        await wait_for(ready, timeout, "the stack to be ready")
        return self.state()

    async def wait_service(self, name: str, state: str, timeout: float, **expect) -> dict:
        def check():
            svc = self.state().get("services", {}).get(name, {})
            return svc if svc.get("state") == state and all(
                svc.get(k) == v for k, v in expect.items()) else None

        return await wait_for(check, timeout, f"{name} to be {state} {expect or ''}")

    def hold(self, name: str) -> Path:
        path = self.run_dir / "hold" / name
        path.parent.mkdir(exist_ok=True)
        path.touch()
        return path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 180) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Last resort in a test's finally: the supervisor and every group it started."""
        pids = stack_processes(self.state()) if self.state() else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in pids:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def session_members(sid: int) -> list[psutil.Process]:
    """Live processes of a session (a service and its children, e.g. vLLM's engine core)."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and alive(proc):
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return out


def stack_processes(state: dict) -> list[psutil.Process]:
    """Every live process of every service of the stack (whole sessions)."""
    out = []
    for svc in state.get("services", {}).values():
        if svc.get("pid"):
            out.extend(session_members(svc["pid"]))
    return out


def mentions(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains `text` (e.g. the run dir)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if text in " ".join(proc.info["cmdline"] or []) and alive(proc):
                out.append(proc)
        except psutil.NoSuchProcess:
            continue
    return out


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on the port (closed connections in TIME_WAIT don't count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()
        except OSError:
            return False
    return True


def stack_ports(state: dict) -> list[int]:
    ports = []
    for svc in state["services"].values():
        ports.append(svc["port"])
        if svc.get("metrics") and svc["kind"] != "gateway":
            ports.append(int(svc["metrics"].rsplit(":", 1)[1].split("/")[0]))
    return ports


# ---- gateway and trainer -----------------------------------------------------------------------


async def best_of_n(url: str, model: str = "policy", n: int = 2, timeout: float = 120,
                    **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hello"}], "n": n, "max_tokens": 6,
            "seed": 1, "model": model, **extra}
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        return await client.post(f"{url}/v1/best-of-n", json=body)


async def status_of(url: str, path: str) -> int:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        try:
            return (await client.get(f"{url}{path}")).status_code
        except httpx.HTTPError:
            return 0


@dataclass
class RunWatch:
    """Everything WatchRun said about one run, collected in the background."""

    metrics: list = field(default_factory=list)
    events: list = field(default_factory=list)
    task: asyncio.Task | None = None

    @property
    def steps(self) -> list[int]:
        return [m.step for m in self.metrics]

    def states(self) -> list[str]:
        return [trainer_pb2.RunState.Name(e.state) for e in self.events]

    def events_of(self, kind: int) -> list:
        return [e for e in self.events if e.kind == kind]


async def start_run(trainer_addr: str, run_id: str, config: trainer_pb2.RunConfig,
                    token: str) -> RunWatch:
    """StartRun with the trainer's admin `token`, then WatchRun in the background."""
    async with TrainerClient(trainer_addr, token=token) as trainer:
        await trainer.start_run(config, run_id, timeout=120)
    watch = RunWatch()

    async def follow():
        async with TrainerClient(trainer_addr, token=token) as trainer:
            async for update in trainer.watch_run(run_id, from_step=1):
                if update.HasField("metrics"):
                    watch.metrics.append(update.metrics)
                else:
                    watch.events.append(update.event)

    watch.task = asyncio.create_task(follow())
    return watch


async def get_run(trainer_addr: str, run_id: str, token: str) -> trainer_pb2.Run:
    async with TrainerClient(trainer_addr, token=token) as trainer:
        return await trainer.get_run(run_id, timeout=30)


async def stop_run(trainer_addr: str, run_id: str, token: str) -> None:
    async with TrainerClient(trainer_addr, token=token) as trainer:
        await trainer.stop_run(run_id, timeout=30)


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
