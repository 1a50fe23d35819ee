"""gRPC server start-up shared by every service.

Lifecycle: bind and start (health says NOT_SERVING, so probes see a live but unready pod) ->
`app.startup()` (e.g. load the model) -> SERVING -> wait for SIGTERM/SIGINT -> NOT_SERVING ->
`drain_delay_seconds` (load balancers move away) -> refuse new calls and give in-flight ones
`drain_grace_seconds` to finish -> `app.shutdown()`. Every server holds the bounds of
rlhf.plumbing.limits (message sizes, concurrent calls, keepalive, call durations).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rlhf.plumbing.config import ServiceConfig
from rlhf.plumbing.interceptors import ServiceInterceptor
from rlhf.plumbing.limits import PROBE_HEADROOM, LimitsInterceptor, server_options
from rlhf.plumbing.metrics import RpcMetrics, serve_metrics
from rlhf.plumbing.tls import server_credentials

log = logging.getLogger("rlhf.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceApp(Protocol):
    """What a service hands to the server: its gRPC services and its start-up and shut-down."""

    #: Full names of the gRPC services it registers, e.g. ["rlhf.v1.PolicyService"].
    service_names: Sequence[str]
    # Optional: `interceptors`, server interceptors of its own (e.g. rlhf.plumbing.auth).

    def register(self, server: grpc.aio.Server) -> None: ...

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...


class GrpcServer:
    """A running service: gRPC port, health, reflection, metrics port, and its drain."""

    def __init__(self, config: ServiceConfig, app: ServiceApp):
        self.config = config
        self.app = app
        self.health = health.aio.HealthServicer()
        self.port: int = 0
        self.metrics_port: int | None = None
        self._metrics_server = None
        self._server: grpc.aio.Server | None = None
        self.limits: LimitsInterceptor | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.ready = False

    async def start(self) -> GrpcServer:
        """Binds the port and runs `app.startup()`; returns once the service is SERVING.
        If start-up fails the server is stopped and the error propagates."""
        cfg = self.config
        metrics = RpcMetrics.for_service(cfg.service) if cfg.metrics_enabled else None
        limits = cfg.server_limits()
        self.limits = LimitsInterceptor(limits)
        server = grpc.aio.server(
            # The bounds and the app's own (e.g. auth) run inside ours, so the RPC metrics count
            # their refusals.
            interceptors=[ServiceInterceptor(metrics), self.limits,
                          *getattr(self.app, "interceptors", ())],
            options=[*server_options(limits), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs + PROBE_HEADROOM,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.app.register(server)
        names = [*self.app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        for name in ("", *self.app.service_names):
            await self.health.set(name, NOT_SERVING)

        address = f"{cfg.host}:{cfg.grpc_port}"
        creds = server_credentials(cfg.tls)
        try:
            if creds is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, creds)
        except RuntimeError as exc:  # grpc raises RuntimeError when the port is taken
            raise OSError(f"cannot bind gRPC port {address} (in use?): {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {address} (in use?)")
        self._server = server
        await server.start()
        if cfg.metrics_enabled:
            self._metrics_server, self.metrics_port = serve_metrics(cfg.host, cfg.metrics_port)
        log.info(
            "%s listening on %s:%d (%s), metrics on :%s; starting up",
            cfg.service, cfg.host, self.port, "TLS" if creds else "plaintext", self.metrics_port,
        )
        if hasattr(self.app, "report_health"):
            self.app.report_health = self.report_health
        try:
            await self.app.startup()
        except BaseException:
            await self._stop_transport(grace=0)
            raise
        for name in ("", *self.app.service_names):
            await self.health.set(name, SERVING)
        self.ready = True
        log.info("%s ready", cfg.service)
        return self

    async def report_health(self, serving: bool, reason: str = "") -> None:
        """Lets a service flip its health after start-up (e.g. its engine died), so probes and
        load balancers stop sending it work."""
        if self._stopping:
            return
        self.ready = serving
        if not serving:
            log.error("%s reports NOT_SERVING: %s", self.config.service, reason)
        for name in ("", *self.app.service_names):
            await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def shutdown(self) -> None:
        """Graceful drain; safe to call more than once."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.ready = False
        cfg = self.config
        log.info("%s draining: NOT_SERVING, new calls refused in %.1fs", cfg.service,
                 cfg.drain_delay_seconds)
        # enter_graceful_shutdown sets every service NOT_SERVING and ignores later set() calls.
        await self.health.enter_graceful_shutdown()
        if cfg.drain_delay_seconds > 0:
            await asyncio.sleep(cfg.drain_delay_seconds)
        await self._stop_transport(grace=cfg.drain_grace_seconds)
        try:
            await self.app.shutdown()
        finally:
            self._stopped.set()
            log.info("%s stopped", cfg.service)

    async def _stop_transport(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def run_until_signalled(config: ServiceConfig, app: ServiceApp) -> None:
    """Runs a service until SIGTERM or SIGINT, then drains it. The process entry point."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = GrpcServer(config, app)
    start = asyncio.ensure_future(server.start())
    stop_wait = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        start.result()  # start-up errors end the process here
        print(f"READY {config.service} grpc={server.port} metrics={server.metrics_port}",
              flush=True)
        await stop_wait
    else:
        log.info("signal during start-up; stopping")
        start.cancel()
        try:
            await start
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - we are stopping anyway
            pass
    await server.shutdown()
