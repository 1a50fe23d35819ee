"""Client side of PolicyService.PushAdapter: a peft adapter folder streamed as a header and
chunks to one replica, and the outcome of a push to every replica.

The folder is what peft's `save_pretrained` writes (`ADAPTER_CONFIG_FILE` and
`ADAPTER_WEIGHTS_FILE`). Pushing to all replicas with retries and a quorum is
`PolicyClient.push`; staging on all of them and then activating on all or none is
`PolicyClient.stage_and_commit`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from rlhf.formats import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from rlhf.plumbing.auth import bearer_metadata
from rlhf.v1 import policy_pb2, policy_pb2_grpc

CHUNK_BYTES = 1024 * 1024


def adapter_digest(folder: Path) -> str:
    """Hex SHA-256 of an adapter folder's weights: what a push announces and ServedBy reports."""
    return hashlib.sha256((Path(folder) / ADAPTER_WEIGHTS_FILE).read_bytes()).hexdigest()


def push_requests(
    folder: Path, name: str, version: int, base_model_id: str, *, activate: bool = True,
    chunk_bytes: int = CHUNK_BYTES, base_model_fingerprint: str = "", stage_seconds: int = 0,
) -> Iterator[policy_pb2.PushAdapterRequest]:
    folder = Path(folder)
    data = (folder / ADAPTER_WEIGHTS_FILE).read_bytes()
    header = policy_pb2.AdapterHeader(
        adapter=policy_pb2.AdapterRef(name=name, version=version),
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        base_model_id=base_model_id,
        peft_config_json=(folder / ADAPTER_CONFIG_FILE).read_text(),
        skip_activate=not activate,
        base_model_fingerprint=base_model_fingerprint,
        stage_seconds=stage_seconds,
    )
    yield policy_pb2.PushAdapterRequest(header=header)
    for start in range(0, len(data), chunk_bytes):
        yield policy_pb2.PushAdapterRequest(data=data[start:start + chunk_bytes])


def admin_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The admin token as call metadata (none without a token: an open replica)."""
    return bearer_metadata(token) if token else ()


async def push_adapter(
    channel: grpc.aio.Channel, folder: Path, name: str, version: int, base_model_id: str, *,
    token: str | None = None, activate: bool = True, timeout: float = 120.0,
    metadata: tuple[tuple[str, str], ...] = (), base_model_fingerprint: str = "",
    stage_seconds: int = 0,
) -> policy_pb2.PushAdapterResponse:
    """One push on `channel` (one replica); a refusal raises grpc.aio.AioRpcError."""
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    return await stub.PushAdapter(
        push_requests(folder, name, version, base_model_id, activate=activate,
                      base_model_fingerprint=base_model_fingerprint, stage_seconds=stage_seconds),
        metadata=admin_metadata(token) + tuple(metadata), timeout=timeout,
    )


@dataclass
class PushResult:
    """Which replicas (endpoints) confirmed a version, and why the others refused it. After a
    staged push: which of them activated it (`activated`), and why the others missed the
    activation (`missed`)."""

    version: int
    confirmed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    activated: list[str] = field(default_factory=list)
    missed: dict[str, str] = field(default_factory=dict)
