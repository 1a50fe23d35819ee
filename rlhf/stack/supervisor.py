"""The supervisor of a planned stack: starts every service at once, waits until each is ready,
restarts one that dies later, and stops them all together.

A service counts as up once it printed its `READY <kind>` line (in `<run_dir>/logs/<name>.log`)
and its probe passes. One that exits or misses `start_timeout` raises ServiceFailed with the end
of its log, and the caller stops the rest. Afterwards a service that dies is restarted on the same
ports (up to `max_restarts` times), so one crash does not end the stack; while
`<run_dir>/hold/<name>` exists it stays down. `<run_dir>/stack.json` always says what runs where.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.files import atomic_write
from rlhf.stack.logs import last_line, log_has, log_tail
from rlhf.stack.plan import ServiceSpec, StackPlan, UpOptions
from rlhf.stack.probes import ready
from rlhf.stack.processes import exit_text, launch, reap_group, terminate

# A service still starting has nothing to drain: it gets this grace at most.
STARTING_STOP_GRACE = 3.0


class ServiceFailed(RuntimeError):
    """A service did not come up, or died and can't be restarted; `name` and the end of its log
    say why."""

    def __init__(self, name: str, reason: str, log_tail: str):
        super().__init__(f"{name} {reason}")
        self.name, self.reason, self.log_tail = name, reason, log_tail


@dataclass
class Service:
    """A planned service and what is known about its process."""

    spec: ServiceSpec
    popen: subprocess.Popen | None = None  # the current start's process
    # pending, starting, ready, down (exited, restart due or held), restarting, stopping,
    # stopped, failed
    state: str = "pending"
    restarts: int = 0
    started_at: float = 0.0
    log_offset: int = 0  # where this start's output begins in the (appended) log file
    ready_seconds: float | None = None
    last_exit: str = ""

    name = property(lambda self: self.spec.name)
    kind = property(lambda self: self.spec.kind)
    log = property(lambda self: self.spec.log)
    addr = property(lambda self: self.spec.addr)
    url = property(lambda self: self.spec.url)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def describe(self) -> dict:
        """This service's entry in stack.json."""
        spec = self.spec
        out = {"kind": spec.kind, "state": self.state, "pid": self.pid, "port": spec.port,
               "log": str(spec.log), "restarts": self.restarts, "last_exit": self.last_exit}
        if spec.kind == "policy":
            out["ipc_dir"] = str(spec.ipc_dir) if spec.ipc_dir else None
        if spec.kind == "gateway":
            out.update(url=spec.url, metrics=f"{spec.url}/metrics")
        else:
            out.update(addr=spec.addr, metrics=(f"http://{spec.host}:{spec.metrics_port}/metrics"
                                                if spec.metrics_port else None))
        return out


class Stack:
    """Starts, watches and stops the planned services. Use as `async with Stack(...) as stack:`
    (start on enter, stop on exit) or call start()/supervise()/stop() yourself."""

    def __init__(self, plan: StackPlan, opts: UpOptions, console=None):
        from rich.console import Console

        self.plan = plan
        self.services = [Service(spec) for spec in plan.services]
        self.by_name = {s.name: s for s in self.services}
        self.run_dir = plan.run_dir
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
        shutil.rmtree(self.plan.ipc_root, ignore_errors=True)  # vLLM's IPC socket folders
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
                             f"http://{s.spec.host}:{s.spec.metrics_port}/metrics)")
        return "\n".join(lines)

    # -- internals

    def _say(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def _status(self, svc: Service, status: str, done: bool = False) -> None:
        if self._progress is not None and svc.name in self._tasks:
            self._progress.update(self._tasks[svc.name], status=status,
                                  completed=1 if done else 0)

    def _launch(self, svc: Service) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        again = f" (restart {svc.restarts})" if svc.restarts else ""
        svc.popen, svc.log_offset = launch(
            svc.spec.argv, svc.spec.env, svc.log,
            f"=== rlhf up: starting {svc.name} at {stamp}{again} ===")
        svc.state = "starting"
        svc.started_at = time.monotonic()

    async def _wait_ready(self, svc: Service) -> None:
        """READY line in the log, then a probe that passes."""
        from rich.markup import escape

        marker = f"READY {svc.kind}"
        deadline = svc.started_at + self.opts.start_timeout
        seen_ready = False
        while True:
            code = svc.popen.poll()
            if code is not None:
                svc.state = "failed"
                svc.last_exit = exit_text(code)
                self._status(svc, f"[red]exited ({svc.last_exit})")
                raise ServiceFailed(svc.name, f"failed to start: exited ({svc.last_exit})",
                                    log_tail(svc.log))
            if time.monotonic() > deadline:
                svc.state = "failed"
                raise ServiceFailed(svc.name, "failed to start: not healthy after "
                                    f"{self.opts.start_timeout:.0f}s", log_tail(svc.log))
            if not seen_ready:
                seen_ready = log_has(svc.log, svc.log_offset, marker)
                self._status(svc, escape(last_line(svc.log, svc.log_offset)[:70]))
            if seen_ready:
                if await ready(svc.spec):
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
        svc.last_exit = exit_text(svc.popen.poll())
        await self._reap(svc)
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
        timeout = (self.opts.stop_timeout if svc.state == "ready"
                   else min(STARTING_STOP_GRACE, self.opts.stop_timeout))
        svc.state = "stopping"
        if not await terminate(svc.popen, timeout):
            self._say(f"[yellow]![/yellow] {svc.name} did not stop in {timeout:.0f}s; "
                      "killing its process group")
        await self._reap(svc)
        svc.state = "stopped"
        self._write_state()

    async def _reap(self, svc: Service) -> None:
        if not await reap_group(svc.popen):
            self._say(f"[red]✗[/red] processes of {svc.name}'s group {svc.pid} survived SIGKILL")

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
        atomic_write(self.run_dir / "stack.json", json.dumps(data, indent=2) + "\n")
