"""Wires the policy service on the shared gRPC server (rlhf.plumbing.server): the engine (vLLM
unless one is given), the adapter registry and store, the servicer, and admin auth.

Start-up enters the engine (`async with engine`) and everything opened after it on one exit
stack, which shut-down (or a failed start-up) closes. While serving, the engine's health is
polled; when it dies the service reports NOT_SERVING so probes restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from rlhf.formats import base_model_fingerprint
from rlhf.plumbing.auth import AdminAuthInterceptor, require_admin_token
from rlhf.plumbing.command import service_command
from rlhf.plumbing.errors import FailedPrecondition, Unavailable
from rlhf.v1 import policy_pb2, policy_pb2_grpc
from services.policy.adapters import AdapterRegistry, make_registry
from services.policy.adapters.checks import BaseShapes, PushLimits, check_weights
from services.policy.adapters.store import AdapterStore
from services.policy.config import PolicyConfig
from services.policy.engine import Engine
from services.policy.servicer import PolicyServicer
from services.policy.stats import EngineStats

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
# The calls that change the served model: they need the admin token.
ADMIN_METHODS = frozenset(f"/{SERVICE_NAME}/{m}" for m in (
    "PushAdapter", "SetActiveAdapter", "DropAdapter", "KeepAdapter"))
HEALTH_POLL_SECONDS = 1.0
log = logging.getLogger("rlhf.policy")


class _Deferred(policy_pb2_grpc.PolicyServiceServicer):
    """Registered before start-up (gRPC needs handlers before it starts); forwards each call to
    the real servicer once the engine is up. Until then calls get UNAVAILABLE and health says
    NOT_SERVING."""

    def __init__(self, app: PolicyApp):
        self.app = app

    def _target(self) -> PolicyServicer:
        if self.app.servicer is None:
            raise Unavailable("the policy is still loading its model; retry when health is SERVING")
        return self.app.servicer

    async def Generate(self, request, context):
        return await self._target().Generate(request, context)

    async def GenerateStream(self, request, context):
        # Closed with this one, so the call's clean-up runs as soon as the call ends.
        async with contextlib.aclosing(self._target().GenerateStream(request, context)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def PushAdapter(self, request_iterator, context):
        return await self._target().PushAdapter(request_iterator, context)

    async def SetActiveAdapter(self, request, context):
        return await self._target().SetActiveAdapter(request, context)

    async def DropAdapter(self, request, context):
        return await self._target().DropAdapter(request, context)

    async def KeepAdapter(self, request, context):
        return await self._target().KeepAdapter(request, context)

    async def ListAdapters(self, request, context):
        return await self._target().ListAdapters(request, context)

    async def GetInfo(self, request, context):
        return await self._target().GetInfo(request, context)


class PolicyApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, config: PolicyConfig, engine: Engine | None = None):
        self.config = config
        self.stats = EngineStats()
        self.engine = engine
        self.servicer: PolicyServicer | None = None
        self.registry: AdapterRegistry | None = None
        self.store: AdapterStore | None = None
        self.ready = False
        self.report_health = None  # set by GrpcServer before startup()
        # Server interceptors the GrpcServer installs after its own.
        token = config.resolved_admin_token()
        require_admin_token("policy", token, config.insecure_no_auth,
                            f"{PolicyConfig.env_prefix()}ADMIN_TOKEN")
        self.interceptors = (AdminAuthInterceptor(token, ADMIN_METHODS),) if token else ()
        self._resources: contextlib.AsyncExitStack | None = None

    def register(self, server: grpc.aio.Server) -> None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(_Deferred(self), server)

    async def startup(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.config
        model_dir = cfg.resolved_model()
        if not (model_dir / "config.json").exists():
            raise FailedPrecondition(
                f"model folder {model_dir} not found; run `rlhf model prepare` or set "
                "RLHF_POLICY_MODEL"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        shapes = BaseShapes.from_model_dir(model_dir)
        if self.engine is None:
            from services.policy.vllm_backend.engine import VllmEngine

            self.engine = VllmEngine(cfg, self.stats)
        async with contextlib.AsyncExitStack() as stack:
            engine = await stack.enter_async_context(self.engine)
            registry = make_registry(cfg.adapter_mode, cfg.adapters_dir(), engine,
                                     cfg.keep_versions, cfg.max_loaded_adapters, self.stats,
                                     switch_timeout=cfg.switch_timeout_seconds)
            limits = PushLimits(base_model_id=cfg.resolved_base_model_id(),
                                max_rank=cfg.max_lora_rank, max_bytes=cfg.max_adapter_bytes,
                                max_abs_value=cfg.max_adapter_abs_value,
                                max_alpha=cfg.max_lora_alpha,
                                base_model_fingerprint=base_model_fingerprint(
                                    cfg.resolved_model()))
            store = AdapterStore(registry, limits, shapes, self.stats)
            store.clear_staging()
            await registry.restore(
                limits.base_model_id,
                lambda folder: check_weights(folder, shapes, cfg.max_lora_rank),
            )
            watch = asyncio.create_task(self._watch(engine))
            stack.push_async_callback(_cancel, watch)
            self.registry, self.store = registry, store
            self.servicer = PolicyServicer(cfg, engine, registry, store, tokenizer, self.stats,
                                           lambda: self.ready)
            stack.callback(self.servicer.close)
            self._resources = stack.pop_all()  # kept open until shutdown()
        self.ready = True

    async def _watch(self, engine: Engine) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_SECONDS)
            try:
                await engine.check_health()
            except Exception as exc:  # noqa: BLE001 - any failure: this replica can't serve
                self.ready = False
                if self.report_health is not None:
                    await self.report_health(False, str(exc))
                return

    async def shutdown(self) -> None:
        self.ready = False
        resources, self._resources = self._resources, None
        if resources is not None:
            await resources.aclose()


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


command = service_command(PolicyConfig, PolicyApp)
