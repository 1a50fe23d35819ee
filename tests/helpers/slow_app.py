"""A minimal service app for plumbing tests: raw-bytes RPCs served through the shared server.

`test.Slow/Sleep` sleeps for the number of milliseconds in the request and echoes it;
`test.Slow/Fail` raises the domain error named in the request (or a plain RuntimeError);
`test.Slow/Count` streams the numbers 0..N-1. Start-up waits on `gate` when one is given, so tests
can watch the NOT_SERVING -> SERVING transition. Run as a script it serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from rlhf.plumbing import errors
from rlhf.plumbing.config import ServiceConfig
from rlhf.plumbing.logs import current_request_id
from rlhf.plumbing.server import run_until_signalled

SERVICE = "test.Slow"


class SlowConfig(ServiceConfig):
    service = "slowtest"


class SlowApp:
    service_names = (SERVICE,)

    def __init__(self, config=None, gate: asyncio.Event | None = None, startup_error=None):
        self.gate = gate
        self.startup_error = startup_error
        self.shutdown_called = False
        self.seen_request_ids: list[str] = []

    async def _sleep(self, request: bytes, context) -> bytes:
        self.seen_request_ids.append(current_request_id())
        await asyncio.sleep(int(request.decode() or "0") / 1000)
        return request

    async def _fail(self, request: bytes, context) -> bytes:
        name = request.decode()
        if name == "abort":
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "aborted by servicer")
        cls = getattr(errors, name, None)
        if cls is not None:
            raise cls(f"{name} raised on purpose")
        raise RuntimeError("secret internal detail")

    async def _count(self, request: bytes, context):
        for i in range(int(request.decode())):
            yield str(i).encode()
            await asyncio.sleep(0)

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Sleep": grpc.unary_unary_rpc_method_handler(self._sleep),
            "Fail": grpc.unary_unary_rpc_method_handler(self._fail),
            "Count": grpc.unary_stream_rpc_method_handler(self._count),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def startup(self) -> None:
        if self.startup_error is not None:
            raise self.startup_error
        if self.gate is not None:
            await self.gate.wait()

    async def shutdown(self) -> None:
        self.shutdown_called = True


if __name__ == "__main__":
    from rlhf.plumbing.logs import setup_logging

    setup_logging("INFO")
    cfg = SlowConfig.load(grpc_port=int(sys.argv[1]), metrics_port=0,
                          drain_delay_seconds=float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
    asyncio.run(run_until_signalled(cfg, SlowApp()))
