"""Wires the policy servicer into the shared server. The generation engine lands with issue #3;
until then the service starts, reports health and answers GetInfo."""

from __future__ import annotations

import grpc

from rlhf.plumbing.command import service_command
from rlhf.plumbing.info import not_yet, server_info
from rlhf.v1 import policy_pb2, policy_pb2_grpc
from services.policy.config import PolicyConfig

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, app: PolicyApp):
        self.app = app

    async def Generate(self, request, context):
        raise not_yet("Generate", 3)

    async def GenerateStream(self, request, context):
        raise not_yet("GenerateStream", 3)
        yield  # pragma: no cover - makes this an async generator like the real one

    async def PushAdapter(self, request_iterator, context):
        raise not_yet("PushAdapter", 3)

    async def SetActiveAdapter(self, request, context):
        raise not_yet("SetActiveAdapter", 3)

    async def ListAdapters(self, request, context):
        raise not_yet("ListAdapters", 3)

    async def GetInfo(self, request, context):
        cfg = self.app.config
        return policy_pb2.PolicyServiceGetInfoResponse(
            server=server_info("policy", self.app.ready),
            max_n=cfg.max_n,
            max_prompts_per_request=cfg.max_prompts_per_request,
            adapter_mode=(
                policy_pb2.ADAPTER_MODE_MERGED
                if cfg.adapter_mode == "merged"
                else policy_pb2.ADAPTER_MODE_LORA
            ),
        )


class PolicyApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, config: PolicyConfig):
        self.config = config
        self.ready = False

    def register(self, server: grpc.aio.Server) -> None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(self), server)

    async def startup(self) -> None:
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False


command = service_command(PolicyConfig, PolicyApp)
