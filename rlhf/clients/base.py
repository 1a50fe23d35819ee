"""What every typed client shares: a balanced channel built from addresses and the TLS config, a
deadline and an `x-request-id` on every call, retries of calls the peer could not answer yet
(with `on_wait` / `on_recover` hooks), direct channels to single replicas, and `close()`.

A peer is given as `host:port`, several of them, or a `dns:///name:port` that resolves to every
replica (see `rlhf.plumbing.channel`)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.clients.errors import GaveUp, address_text, call_failed
from rlhf.clients.retry import RETRYABLE, Backoff
from rlhf.plumbing.channel import endpoints, make_channel, target_for
from rlhf.plumbing.config import ClientTLS
from rlhf.plumbing.interceptors import REQUEST_ID_KEY
from rlhf.plumbing.logs import current_request_id
from rlhf.plumbing.tls import tls_for_endpoint

log = logging.getLogger("rlhf.clients")

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
# One attempt of a call: (deadline in seconds, metadata) -> the response.
Invoke = Callable[[float, Metadata], Awaitable[T]]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def split_addresses(addrs: str | Sequence[str]) -> list[str]:
    """`a,b` or ["a", "b,c"] -> ["a", "b", "c"] (blank parts dropped)."""
    items = [addrs] if isinstance(addrs, str) else list(addrs)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def check_addresses(addrs: str | Sequence[str]) -> list[str]:
    """The addresses, or ValueError saying what is wrong with them (for config validators):
    none given, a part that is not host:port or dns:///name:port, several host names."""
    parts = split_addresses(addrs)
    if not parts:
        raise ValueError("no address given: use host:port, several of them, or dns:///name:port")
    for part in parts:
        if part.startswith(("ipv4:", "ipv6:", "unix:")):
            continue
        name = part.split("dns:", 1)[1].lstrip("/").rpartition("/")[2] \
            if part.startswith("dns:") else part
        host, sep, port = name.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address {part!r} must be host:port or dns:///name:port")
    target_for(parts)  # several addresses must be IP literals of one family
    return parts


def new_request_id() -> str:
    """The id of the server call being handled (so a hop keeps it), else a fresh one."""
    current = current_request_id()
    return current if current != "-" else uuid.uuid4().hex


class ServiceClient:
    """Base of PolicyClient, RewardClient and TrainerClient.

    `timeout` is each attempt's deadline; `backoff` says how long retryable failures are waited
    out (`NO_RETRY` to fail at once). `on_wait(message)` is called before each wait and
    `on_recover()` once a call succeeds after waiting, e.g. to report a run as WAITING."""

    service: ClassVar[str] = "service"
    stub_class: ClassVar[Callable[[grpc.aio.Channel], Any]]

    def __init__(self, addrs: str | Sequence[str], tls: ClientTLS | None = None, *,
                 timeout: float = 60.0, backoff: Backoff | None = None,
                 on_wait: Callable[[str], None] | None = None,
                 on_recover: Callable[[], None] | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.addrs = split_addresses(addrs)
        if not self.addrs:
            raise ValueError(f"no {self.service} address given")
        self.address = address_text(self.addrs)
        self.tls = tls
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.on_wait, self.on_recover = on_wait, on_recover
        self._max_message_bytes = max_message_bytes
        self.channel = make_channel(self.addrs, tls, max_message_bytes)
        self.stub = self.stub_class(self.channel)
        self._direct: dict[str, tuple[grpc.aio.Channel, Any]] = {}
        self.closed = False

    # ---- channels ----------------------------------------------------------------------------

    def endpoints(self) -> list[str]:
        """Every replica behind the addresses (`dns:///` names resolved now)."""
        return endpoints(self.addrs)

    def open_channel(self, endpoint: str) -> grpc.aio.Channel:
        """A new channel to one replica only (same TLS and limits); the caller closes it."""
        return make_channel(endpoint, tls_for_endpoint(self.tls, self.addrs),
                            self._max_message_bytes)

    def stub_to(self, endpoint: str) -> Any:
        """A stub on a channel to one replica only, opened once and closed by close()."""
        if self.closed:
            raise RuntimeError(f"the {self.service} client is closed")
        if endpoint not in self._direct:
            channel = self.open_channel(endpoint)
            self._direct[endpoint] = (channel, self.stub_class(channel))
        return self._direct[endpoint][1]

    async def close(self) -> None:
        """Closes the balanced channel and every direct one; calls in flight are cancelled."""
        self.closed = True
        channels = [self.channel, *(channel for channel, _ in self._direct.values())]
        self._direct.clear()
        await asyncio.gather(*(channel.close() for channel in channels))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # ---- calls -------------------------------------------------------------------------------

    async def serving(self, timeout: float = 2.0) -> bool:
        """Whether the service answers its health check with SERVING (never raises)."""
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def call(self, method: str, invoke: Invoke[T], *, address: str | None = None,
                   timeout: float | None = None, request_id: str | None = None,
                   backoff: Backoff | None = None) -> T:
        """Runs `invoke(deadline, metadata)` until it answers, retrying retryable codes within
        the backoff's budget. Raises CallFailed (an answer retrying won't change) or GaveUp."""
        timeout = self.timeout if timeout is None else timeout
        backoff = self.backoff if backoff is None else backoff
        address = address or self.address
        metadata: Metadata = ((REQUEST_ID_KEY, request_id or new_request_id()),)
        delays = backoff.delays()
        start, waited = time.monotonic(), False
        while True:
            try:
                result = await invoke(timeout, metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or backoff.max_seconds <= 0:
                    raise call_failed(self.service, address, method, exc) from exc
                delay, elapsed = next(delays), time.monotonic() - start
                if elapsed + delay > backoff.max_seconds:
                    raise call_failed(self.service, address, method, exc, cls=GaveUp,
                                      prefix=f"gave up after {elapsed:.0f}s: ") from exc
                self.report_wait(f"{call_failed(self.service, address, method, exc)}; "
                                 f"retrying in {delay:.1f}s")
                waited = True
                await asyncio.sleep(delay)
                continue
            if waited:
                self.report_recover()
            return result

    def report_wait(self, message: str) -> None:
        log.warning(message)
        if self.on_wait is not None:
            self.on_wait(message)

    def report_recover(self) -> None:
        log.info("%s at %s answers again", self.service, self.address)
        if self.on_recover is not None:
            self.on_recover()
