"""The supervisor on small real processes (an HTTP server that, like a policy process, has a child
of its own): start and wait for READY plus the probe, restart on the same port after a crash,
stop the whole process group, and stop the rest when one fails to start, with the end of its
log. The same behaviour on the real services is in test_up.py and test_fault_drill.py."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from rich.console import Console

from rlhf.stack.plan import ServiceSpec, StackPlan, UpOptions, free_port
from rlhf.stack.processes import group_alive
from rlhf.stack.supervisor import ServiceFailed, Stack
from tests.stack.helpers import wait_for

# Answers /readyz like the gateway; its child sleeps on, as vLLM's engine core would after a
# SIGKILL of its parent, unless the whole group is killed.
SERVER = """\
import http.server, signal, subprocess, sys
port = int(sys.argv[1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"READY gateway http={port} child={child.pid}", flush=True)
server.serve_forever()
"""
FAILING = "import sys; print('model folder /nowhere not found', flush=True); sys.exit(3)"


def _spec(tmp_path: Path, name: str, *args: str) -> ServiceSpec:
    port = free_port()
    return ServiceSpec(name, "gateway", (sys.executable, *args, str(port)), {},
                       tmp_path / "logs" / f"{name}.log", "127.0.0.1", port)


def _stack(tmp_path: Path, *specs: ServiceSpec, **opts) -> Stack:
    (tmp_path / "ipc").mkdir(exist_ok=True)
    plan = StackPlan(tmp_path, specs, {}, (), tmp_path / "ipc")
    options = UpOptions(run_dir=tmp_path, start_timeout=60, stop_timeout=5, **opts)
    return Stack(plan, options, Console(file=io.StringIO()))


def _child_pid(log: Path) -> int:
    line = next(ln for ln in reversed(log.read_text().splitlines()) if ln.startswith("READY"))
    return int(line.rsplit("child=", 1)[1])


def _state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "stack.json").read_text())


@pytest.fixture
def server(tmp_path) -> Path:
    path = tmp_path / "server.py"
    path.write_text(SERVER)
    return path


async def test_restarts_a_dead_service_on_its_port_and_stops_its_whole_group(tmp_path, server):
    stack = _stack(tmp_path, _spec(tmp_path, "web", str(server)))
    web = stack.by_name["web"]
    stop = asyncio.Event()
    await stack.start()
    try:
        assert _state(tmp_path)["services"]["web"]["state"] == "ready"
        first_pid, child = web.pid, _child_pid(web.log)
        watcher = asyncio.ensure_future(stack.supervise(stop))
        os.kill(first_pid, signal.SIGKILL)
        await wait_for(lambda: web.state == "ready" and web.restarts == 1, 60, "the restart")
        assert web.pid != first_pid
        assert not group_alive(first_pid)  # the orphaned child went with its group
        assert _state(tmp_path)["services"]["web"] == {**web.describe(), "restarts": 1}
        assert web.describe()["port"] == web.spec.port
        assert "(restart 1)" in web.log.read_text()
        assert child != _child_pid(web.log)
        stop.set()
        await watcher
    finally:
        pid = web.pid
        await stack.stop()
    assert not group_alive(pid)
    state = _state(tmp_path)
    assert state["state"] == "stopped" and state["services"]["web"]["state"] == "stopped"
    assert not (tmp_path / "ipc").exists()


async def test_one_that_fails_to_start_raises_with_its_log_and_the_rest_stop(tmp_path, server):
    stack = _stack(tmp_path, _spec(tmp_path, "web", str(server)),
                   _spec(tmp_path, "bad", "-c", FAILING))
    with pytest.raises(ServiceFailed) as info:
        await stack.start()
    assert str(info.value) == "bad failed to start: exited (exit code 3)"
    assert "model folder /nowhere not found" in info.value.log_tail
    web = stack.by_name["web"]
    await stack.stop()
    assert not group_alive(web.pid)
    assert {name: svc["state"] for name, svc in _state(tmp_path)["services"].items()} == {
        "web": "stopped", "bad": "stopped"}
    assert _state(tmp_path)["services"]["bad"]["last_exit"] == "exit code 3"


async def test_without_restarts_a_crash_ends_supervision(tmp_path, server):
    stack = _stack(tmp_path, _spec(tmp_path, "web", str(server)), restart=False)
    await stack.start()
    try:
        os.kill(stack.by_name["web"].pid, signal.SIGTERM)
        with pytest.raises(ServiceFailed, match=r"web exited \(exit code 0\) and restarts are off"):
            await asyncio.wait_for(stack.supervise(asyncio.Event()), 60)
    finally:
        await stack.stop()
