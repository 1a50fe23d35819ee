"""Server bounds (rlhf.plumbing.limits) on a real server: request size, concurrent calls (health
exempt), call duration, a stream whose client stops reading, aborting a call with a status, and
keepalive settings that admit our own clients' pings."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from rlhf.plumbing import channel as channel_module
from rlhf.plumbing.errors import Aborted
from rlhf.plumbing.limits import abort_call, server_options
from rlhf.plumbing.server import GrpcServer
from tests.fixtures.grpc_helpers import health_status
from tests.fixtures.slow_app import SlowConfig

SERVICE = "test.Bounded"
BIG = b"x" * 65536


class BoundedApp:
    """`Hold` waits until released (or aborted); `Flood` streams 64 KiB messages without end.
    Each records that its clean-up ran."""

    service_names = (SERVICE,)

    def __init__(self):
        self.release = asyncio.Event()
        self.holding: list[asyncio.Task] = []
        self.cleaned = asyncio.Event()
        self.sent = 0

    async def _hold(self, request: bytes, context) -> bytes:
        self.holding.append(asyncio.current_task())
        try:
            await self.release.wait()
            return request
        finally:
            self.cleaned.set()

    async def _flood(self, request: bytes, context):
        try:
            while True:
                self.sent += 1
                yield BIG
        finally:
            self.cleaned.set()

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Hold": grpc.unary_unary_rpc_method_handler(self._hold),
            "Flood": grpc.unary_stream_rpc_method_handler(self._flood),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.release.set()


async def _serve(**limits):
    cfg = SlowConfig.load(grpc_port=0, metrics_port=0, drain_grace_seconds=0.5, **limits)
    app = BoundedApp()
    server = await GrpcServer(cfg, app).start()
    return server, app, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


async def _until(predicate, what: str, limit: float = 30.0) -> None:
    for _ in range(int(limit / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not seen: {what}")


async def test_a_request_larger_than_the_receive_bound_is_resource_exhausted():
    server, _, ch = await _serve(max_receive_bytes=64 * 1024)
    try:
        hold = ch.unary_unary(f"/{SERVICE}/Hold")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hold(b"x" * (65 * 1024), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await ch.close()
        await server.shutdown()


async def test_calls_beyond_the_concurrency_bound_are_refused_but_health_answers():
    server, app, ch = await _serve(max_concurrent_rpcs=2)
    try:
        hold = ch.unary_unary(f"/{SERVICE}/Hold")
        held = [asyncio.ensure_future(hold(b"a", timeout=30)) for _ in range(2)]
        await _until(lambda: len(app.holding) == 2, "two calls held")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hold(b"b", timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_rpcs" in err.value.details()
        assert await health_status(ch) == "SERVING"
        app.release.set()
        assert await asyncio.gather(*held) == [b"a", b"a"]
        assert await hold(b"c", timeout=10) == b"c"  # the slots came back
    finally:
        await ch.close()
        await server.shutdown()


async def test_a_call_past_its_maximum_duration_is_ended_with_its_clean_up():
    server, app, ch = await _serve(max_call_seconds=0.5)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(f"/{SERVICE}/Hold")(b"a", timeout=60)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "max_call_seconds" in err.value.details()
        assert app.cleaned.is_set()
        assert server.limits.in_flight == 0
    finally:
        await ch.close()
        await server.shutdown()


async def test_a_stream_whose_client_stops_reading_is_ended_and_cleaned_up():
    server, app, ch = await _serve(stream_send_timeout_seconds=0.5)
    try:
        call = ch.unary_stream(f"/{SERVICE}/Flood")(b"", timeout=120)
        await call.read()  # the stream runs; then the client reads no more
        await _until(app.cleaned.is_set, "the stream's clean-up")
        assert server.limits.in_flight == 0
        # A client that reads again gets what was sent, then the reason the call ended.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "stream_send_timeout_seconds" in err.value.details()
    finally:
        await ch.close()
        await server.shutdown()


async def test_abort_call_ends_another_call_with_the_given_status():
    server, app, ch = await _serve()
    try:
        pending = asyncio.ensure_future(ch.unary_unary(f"/{SERVICE}/Hold")(b"a", timeout=30))
        await _until(lambda: app.holding, "the call held")
        abort_call(app.holding[0], Aborted("the replica switches adapters"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pending
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert err.value.details() == "the replica switches adapters"
        assert app.cleaned.is_set()
    finally:
        await ch.close()
        await server.shutdown()


def test_server_keepalive_admits_the_pings_of_our_own_clients(monkeypatch):
    seen = {}

    def capture(target, options=None, **kw):
        seen.update(dict(options))
        return object()

    monkeypatch.setattr(channel_module.grpc.aio, "insecure_channel", capture)
    channel_module.make_channel("127.0.0.1:1")
    server = dict(server_options(SlowConfig.load().server_limits()))
    # Our clients ping only while a call runs, every keepalive_time_ms; the server must not
    # count those pings as strikes.
    assert server["grpc.http2.min_ping_interval_without_data_ms"] < seen["grpc.keepalive_time_ms"]
    assert seen.get("grpc.keepalive_permit_without_calls", 0) <= (
        server["grpc.keepalive_permit_without_calls"])
    assert server["grpc.max_connection_age_grace_ms"] > 0


def test_each_service_receives_what_its_largest_rpc_needs():
    from services.policy.config import PolicyConfig
    from services.reward.config import RewardConfig

    policy = PolicyConfig.load().server_limits().max_receive_bytes
    # A full Generate: 256 prompts at the 2048-token context fit; a push chunk (4 MiB) fits.
    assert 256 * 2048 * 8 < policy <= 16 * 1024 * 1024
    assert PolicyConfig.load(max_model_len=512).server_limits().max_receive_bytes >= 4 << 20
    assert RewardConfig.load().server_limits().max_receive_bytes == 32 * 1024 * 1024
    assert SlowConfig.load().server_limits().max_receive_bytes == 4 * 1024 * 1024
    assert SlowConfig.load(max_receive_bytes=1 << 20).server_limits().max_receive_bytes == 1 << 20
