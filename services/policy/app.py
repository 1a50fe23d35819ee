"""Wires the policy service: vLLM engine, adapter registry, servicer, shared server."""

from __future__ import annotations

import asyncio
import logging

import grpc

from rlhf.plumbing.command import service_command
from rlhf.plumbing.errors import FailedPrecondition, Unavailable
from rlhf.v1 import policy_pb2, policy_pb2_grpc
from services.policy.adapters import AdapterRegistry
from services.policy.config import PolicyConfig
from services.policy.push import BaseShapes
from services.policy.servicer import PolicyServicer
from services.policy.stats import EngineStats

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
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
        async for chunk in self._target().GenerateStream(request, context):
            yield chunk

    async def PushAdapter(self, request_iterator, context):
        return await self._target().PushAdapter(request_iterator, context)

    async def SetActiveAdapter(self, request, context):
        return await self._target().SetActiveAdapter(request, context)

    async def ListAdapters(self, request, context):
        return await self._target().ListAdapters(request, context)

    async def GetInfo(self, request, context):
        return await self._target().GetInfo(request, context)


class PolicyApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, config: PolicyConfig, engine=None):
        self.config = config
        self.stats = EngineStats()
        self.engine = engine
        self.servicer: PolicyServicer | None = None
        self.registry: AdapterRegistry | None = None
        self.ready = False
        self.report_health = None  # set by GrpcServer before startup()

    def register(self, server: grpc.aio.Server) -> None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(_Deferred(self), server)

    async def startup(self) -> None:
        from transformers import AutoTokenizer

        from services.policy.vllm_engine import VllmEngine

        cfg = self.config
        model_dir = cfg.resolved_model()
        if not (model_dir / "config.json").exists():
            raise FailedPrecondition(
                f"model folder {model_dir} not found; run `rlhf model prepare` or set "
                "RLHF_POLICY_MODEL"
            )
        if not cfg.admin_token:
            log.warning("no admin_token configured: anyone who reaches this port can push and "
                        "activate adapters (set RLHF_POLICY_ADMIN_TOKEN)")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        shapes = BaseShapes.from_model_dir(model_dir)
        if self.engine is None:
            self.engine = VllmEngine(cfg, self.stats)
        self.engine.on_dead = self._engine_died
        await self.engine.start()
        self.registry = AdapterRegistry(
            cfg.adapters_dir(), self.engine, cfg.adapter_mode, cfg.keep_versions,
            cfg.max_loaded_adapters, self.stats,
        )
        await self.registry.restore()
        self.servicer = PolicyServicer(cfg, self.engine, self.registry, tokenizer, shapes,
                                       self.stats, lambda: self.ready)
        self.ready = True

    def _engine_died(self) -> None:
        if self.ready and self.report_health is not None:
            self.ready = False
            asyncio.ensure_future(self.report_health(False, "the vLLM engine core died"))

    async def shutdown(self) -> None:
        self.ready = False
        if self.engine is not None:
            await self.engine.stop()


command = service_command(PolicyConfig, PolicyApp)
