"""The shared gRPC server on a real port: health transitions, request ids, error mapping,
metrics, reflection, graceful drain (in-process and on SIGTERM)."""

from __future__ import annotations

import asyncio
import signal
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rlhf.plumbing.server import GrpcServer
from tests.fixtures.grpc_helpers import health_status, read_until, start_process
from tests.fixtures.slow_app import SlowApp, SlowConfig


def _config(**kw) -> SlowConfig:
    kw.setdefault("grpc_port", 0)
    kw.setdefault("metrics_port", 0)
    kw.setdefault("drain_grace_seconds", 5.0)
    return SlowConfig.load(**kw)


@pytest.fixture
async def server():
    srv = await GrpcServer(_config(), SlowApp()).start()
    yield srv
    await srv.shutdown()


async def test_health_not_serving_until_startup_finishes():
    gate = asyncio.Event()
    srv = GrpcServer(_config(), SlowApp(gate=gate))
    starting = asyncio.create_task(srv.start())
    while srv.port == 0:
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        assert await health_status(ch) == "NOT_SERVING"
        assert await health_status(ch, "test.Slow") == "NOT_SERVING"
        gate.set()
        await starting
        assert await health_status(ch) == "SERVING"
        assert await health_status(ch, "test.Slow") == "SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_status(ch, "no.Such")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await srv.shutdown()


async def test_failed_startup_stops_the_server():
    srv = GrpcServer(_config(), SlowApp(startup_error=RuntimeError("no model")))
    with pytest.raises(RuntimeError, match="no model"):
        await srv.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_status(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_request_id_is_propagated_and_returned(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = ch.unary_unary("/test.Slow/Sleep")(b"0", metadata=(("x-request-id", "abc-123"),))
        assert await call == b"0"
        trailing = dict(await call.trailing_metadata())
        assert trailing["x-request-id"] == "abc-123"
        # No id (or an unusable one) from the caller: one is generated.
        bad_id = "bad id " + "x" * 200
        call = ch.unary_unary("/test.Slow/Sleep")(b"0", metadata=(("x-request-id", bad_id),))
        await call
        generated = dict(await call.trailing_metadata())["x-request-id"]
        assert " " not in generated and len(generated) == 32
    assert server.app.seen_request_ids == ["abc-123", generated]


@pytest.mark.parametrize(
    "name,code",
    [
        ("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT),
        ("NotFound", grpc.StatusCode.NOT_FOUND),
        ("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION),
        ("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("Unavailable", grpc.StatusCode.UNAVAILABLE),
        ("Unauthenticated", grpc.StatusCode.UNAUTHENTICATED),
        ("PermissionDenied", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_domain_errors_map_to_status_codes(server, name, code):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Slow/Fail")(name.encode(), timeout=5)
    assert err.value.code() == code
    assert err.value.details() == f"{name} raised on purpose"


async def test_unexpected_error_is_internal_without_details(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = ch.unary_unary("/test.Slow/Fail")(b"boom", metadata=(("x-request-id", "rid-9"),))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "rid-9" in err.value.details()
    assert "secret internal detail" not in err.value.details()
    assert "Traceback" not in err.value.details()
    # The server keeps serving after an unexpected error.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        assert await ch.unary_unary("/test.Slow/Sleep")(b"1", timeout=5) == b"1"


async def test_servicer_abort_keeps_its_code(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Slow/Fail")(b"abort", timeout=5)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert err.value.details() == "aborted by servicer"


async def test_streaming_rpc_through_interceptor(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        items = [m async for m in ch.unary_stream("/test.Slow/Count")(b"5", timeout=5)]
    assert items == [b"0", b"1", b"2", b"3", b"4"]


async def test_metrics_count_calls_by_method_and_code(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        for _ in range(3):
            await ch.unary_unary("/test.Slow/Sleep")(b"0")
        with pytest.raises(grpc.aio.AioRpcError):
            await ch.unary_unary("/test.Slow/Fail")(b"NotFound")
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    lines = body.splitlines()

    def value(prefix: str) -> float:
        return float(next(line for line in lines if line.startswith(prefix)).split()[-1])

    assert value('rlhf_slowtest_grpc_requests_total{code="OK",method="Sleep"}') >= 3
    assert value('rlhf_slowtest_grpc_requests_total{code="NOT_FOUND",method="Fail"}') >= 1
    assert value('rlhf_slowtest_grpc_request_duration_seconds_count{method="Sleep"}') >= 3
    # Health probes are not counted (they would drown the series).
    assert "method=\"Check\"" not in body


async def test_reflection_lists_services(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        names = set()
        async for resp in stub.ServerReflectionInfo(iter([req])):
            names |= {s.name for s in resp.list_services_response.service}
    assert {"test.Slow", "grpc.health.v1.Health"} <= names


async def test_drain_finishes_in_flight_and_refuses_new_calls():
    srv = await GrpcServer(_config(drain_delay_seconds=0.5), SlowApp()).start()
    target = f"127.0.0.1:{srv.port}"
    async with grpc.aio.insecure_channel(target) as ch:
        in_flight = asyncio.ensure_future(ch.unary_unary("/test.Slow/Sleep")(b"1500", timeout=10))
        await asyncio.sleep(0.2)
        draining = asyncio.create_task(srv.shutdown())
        await asyncio.sleep(0.1)
        # During the drain delay: NOT_SERVING, but the port still answers.
        assert await health_status(ch) == "NOT_SERVING"
        await asyncio.sleep(0.6)
        # After the delay: new calls are refused while the old one is still running.
        assert not in_flight.done()
        async with grpc.aio.insecure_channel(target) as fresh:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await fresh.unary_unary("/test.Slow/Sleep")(b"0", timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await in_flight == b"1500"
        await draining
    assert srv.app.shutdown_called


def test_sigterm_drains_a_real_process(tmp_path):
    from tests.fixtures.ports import free_port

    port = free_port()
    proc = start_process(["-m", "tests.fixtures.slow_app", str(port), "0.3"])
    try:
        read_until(proc, "READY slowtest")

        async def scenario():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                sleep = ch.unary_unary("/test.Slow/Sleep")
                call = asyncio.ensure_future(sleep(b"1000", timeout=10))
                await asyncio.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.1)
                status = await health_status(ch)
                return status, await call

        status, reply = asyncio.run(scenario())
        assert status == "NOT_SERVING"
        assert reply == b"1000"
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "Traceback" not in out, out
    assert "slowtest stopped" in out
