"""A policy replica with no model for client tests (real grpc.aio server on 127.0.0.1): it keeps
the adapter versions pushed to it, answers Generate pinned to those only (NOT_FOUND otherwise,
as a real replica does), and records what it was asked."""

from __future__ import annotations

import asyncio

import grpc

from rlhf.plumbing.config import ServerTLS
from rlhf.plumbing.tls import server_credentials
from rlhf.v1 import policy_pb2, policy_pb2_grpc


class FakePolicy(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, name: str, refuse: bool = False, delay: float = 0.0):
        self.name = name
        self.refuse = refuse  # refuse every push, as a replica does a bad adapter
        self.delay = delay  # seconds each Generate / ListAdapters takes
        self.kept: set[tuple[str, int]] = set()
        self.pushed: list[int] = []  # versions received, refused ones included
        self.generate_calls = 0
        self.served = 0
        self.request_ids: list[str | None] = []

    async def PushAdapter(self, request_iterator, context):
        header = None
        async for part in request_iterator:
            if part.HasField("header"):
                header = part.header
        ref = header.adapter
        self.pushed.append(ref.version)
        if self.refuse:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rank 64 exceeds max 16")
        self.kept.add((ref.name, ref.version))
        return policy_pb2.PushAdapterResponse(activated=True)

    async def Generate(self, request, context):
        self.generate_calls += 1
        self.request_ids.append(dict(context.invocation_metadata()).get("x-request-id"))
        await asyncio.sleep(self.delay)
        ref = request.adapter.pinned
        if request.adapter.target == policy_pb2.ADAPTER_TARGET_PINNED and \
                (ref.name, ref.version) not in self.kept:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"adapter {ref.name}@v{ref.version} is not kept")
        self.served += 1
        return policy_pb2.GenerateResponse(results=[
            policy_pb2.PromptResult(prompt_index=i, served_by=policy_pb2.ServedBy(adapter=ref),
                                    prompt_token_ids=[1],
                                    completions=[policy_pb2.Completion(text=self.name)])
            for i in range(len(request.prompts))])

    async def ListAdapters(self, request, context):
        await asyncio.sleep(self.delay)
        versions = [v for n, v in self.kept if n == request.name]
        return policy_pb2.ListAdaptersResponse(next_version=max(versions, default=0) + 1)

    async def GetInfo(self, request, context):
        return policy_pb2.PolicyServiceGetInfoResponse(base_model_id="tiny")


async def serve(servicer: FakePolicy, port: int, tls: ServerTLS | None = None) -> grpc.aio.Server:
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    if tls is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        server.add_secure_port(f"127.0.0.1:{port}", server_credentials(tls))
    await server.start()
    return server


def adapter_folder(path):
    """The two files a push reads (their content is not checked by FakePolicy)."""
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (path / "adapter_config.json").write_text("{}")
    return path
