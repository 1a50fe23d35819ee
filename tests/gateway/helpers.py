"""A real gateway (uvicorn, real HTTP on 127.0.0.1) in a thread with its own event loop.

The policy and reward servers of the test session live on the session's event loop, which only
runs while an async test awaits; the gateway gets a loop of its own so the two never wait on
each other, and blocking tools (schemathesis, hey) run in threads or subprocesses."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

from gateway.config import GatewayConfig
from rlhf.clients.push import push_adapter

KEY = "test-key-0123456789"


class GatewayThread:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.port: int | None = None
        self._ready = threading.Event()
        self._server = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="gateway")

    def _run(self) -> None:
        import uvicorn

        from gateway.app import create_app

        async def main():
            self._server = uvicorn.Server(uvicorn.Config(
                create_app(self.config), host="127.0.0.1", port=0, log_config=None,
                access_log=False, timeout_graceful_shutdown=5))
            task = asyncio.create_task(self._server.serve())
            while not self._server.started and not task.done():
                await asyncio.sleep(0.02)
            if self._server.started:
                self.port = self._server.servers[0].sockets[0].getsockname()[1]
            self._ready.set()
            await task

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()

    def start(self) -> GatewayThread:
        self._thread.start()
        self._ready.wait(60)
        if self.port is None:
            raise RuntimeError(f"gateway did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_gateway(tmp: Path, policy_addr: str, reward_addr: str, **overrides) -> GatewayThread:
    settings = dict(http_port=0, policy_addr=[policy_addr], reward_addr=[reward_addr],
                    data_dir=tmp, rate_limit_per_minute=0, upstream_timeout_seconds=60)
    settings.update(overrides)
    return GatewayThread(GatewayConfig.load(**settings)).start()


class HungServer:
    """Accepts TCP connections and never answers: an upstream that hangs (not one that is down)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def push_policy_version(policy, adapter_dir: Path, version: int, name: str):
    """Loads an adapter on the test policy without making it active (other tests rely on the
    active version)."""
    from tests.fixtures.policy_helpers import ADMIN

    return await push_adapter(policy.channel, adapter_dir, name, version, "tiny", token=ADMIN,
                              activate=False)
