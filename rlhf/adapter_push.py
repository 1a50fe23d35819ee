"""Client side of PolicyService.PushAdapter: streams a peft adapter folder as header + chunks.

Used by the trainer (after each step), by `rlhf` tooling and by tests. The folder is what peft's
`save_pretrained` writes: adapter_config.json and adapter_model.safetensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc

from rlhf.v1 import policy_pb2, policy_pb2_grpc

CHUNK_BYTES = 1024 * 1024


def push_requests(
    folder: Path, name: str, version: int, base_model_id: str, *, activate: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[policy_pb2.PushAdapterRequest]:
    folder = Path(folder)
    data = (folder / "adapter_model.safetensors").read_bytes()
    header = policy_pb2.AdapterHeader(
        adapter=policy_pb2.AdapterRef(name=name, version=version),
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        base_model_id=base_model_id,
        peft_config_json=(folder / "adapter_config.json").read_text(),
        skip_activate=not activate,
    )
    yield policy_pb2.PushAdapterRequest(header=header)
    for start in range(0, len(data), chunk_bytes):
        yield policy_pb2.PushAdapterRequest(data=data[start:start + chunk_bytes])


def admin_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def push_adapter(
    channel: grpc.aio.Channel, folder: Path, name: str, version: int, base_model_id: str, *,
    token: str | None = None, activate: bool = True, timeout: float = 120.0,
) -> policy_pb2.PushAdapterResponse:
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    return await stub.PushAdapter(
        push_requests(folder, name, version, base_model_id, activate=activate),
        metadata=admin_metadata(token), timeout=timeout,
    )
