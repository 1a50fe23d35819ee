"""Typed client of the reward service (`rlhf.v1.RewardService`), balanced over every replica:
Score, GetInfo, and the reward-model versions (push a folder, activate or roll back, list).

`token` is the reward service's admin token, sent as `authorization: Bearer <token>` metadata on
PushRewardModel and SetActiveRewardModel. A push and an activation go to every replica, one
after the other; the first refusal raises CallFailed naming the replica."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from rlhf.clients.base import ServiceClient
from rlhf.plumbing.auth import bearer_metadata
from rlhf.v1 import reward_pb2, reward_pb2_grpc

CHUNK_BYTES = 1024 * 1024
# What the server accepts as a file name (no sub-folders): other entries of a folder (hidden
# files, a training run's checkpoint folder) are not part of the model and are not sent.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


def model_files(folder: Path) -> list[Path]:
    """The files of a reward-model folder that a push sends, by name."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} is not a reward-model folder (no config.json)")
    return sorted(p for p in folder.iterdir() if p.is_file() and _FILE_NAME.match(p.name))


def push_reward_model_requests(
    folder: Path, version: str, *, heldout_accuracy: float | None = None,
    metadata: Mapping[str, str] | None = None, activate: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[reward_pb2.PushRewardModelRequest]:
    """The header, then the files' bytes in chunks (files read one at a time)."""
    files = model_files(folder)
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(chunk_bytes), b""):
                digest.update(block)
    header = reward_pb2.RewardModelHeader(
        version=version,
        files=[reward_pb2.RewardModelFile(name=p.name, size_bytes=p.stat().st_size)
               for p in files],
        sha256=digest.hexdigest(),
        size_bytes=sum(p.stat().st_size for p in files),
        skip_activate=not activate,
        metadata={str(k): str(v) for k, v in (metadata or {}).items()},
    )
    if heldout_accuracy is not None:
        header.heldout_accuracy = float(heldout_accuracy)
    yield reward_pb2.PushRewardModelRequest(header=header)
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(chunk_bytes), b""):
                yield reward_pb2.PushRewardModelRequest(data=block)


class RewardClient(ServiceClient):
    service = "reward"
    stub_class = reward_pb2_grpc.RewardServiceStub

    def __init__(self, *args, token: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._auth = bearer_metadata(token) if token else ()

    async def score_response(self, items: Sequence[reward_pb2.ScoreItem], *,
                             timeout: float | None = None,
                             request_id: str | None = None) -> reward_pb2.ScoreResponse:
        """The whole answer: each item's score, its parts by scorer, and the reward-model
        versions that produced them."""
        request = reward_pb2.ScoreRequest(items=list(items))
        return await self.call("Score", lambda t, md: self.stub.Score(
            request, timeout=t, metadata=md), timeout=timeout, request_id=request_id)

    async def score(self, items: Sequence[reward_pb2.ScoreItem], *,
                    timeout: float | None = None, request_id: str | None = None) -> list[float]:
        """One score per item, in order (build items with `rlhf.formats.score_item`)."""
        response = await self.score_response(items, timeout=timeout, request_id=request_id)
        return [s.score for s in response.scores]

    async def get_info(self, *, timeout: float = 30.0, request_id: str | None = None,
                       ) -> reward_pb2.RewardServiceGetInfoResponse:
        return await self.call("GetInfo", lambda t, md: self.stub.GetInfo(
            reward_pb2.RewardServiceGetInfoRequest(), timeout=t, metadata=md),
            timeout=timeout, request_id=request_id)

    # ---- reward-model versions ---------------------------------------------------------------

    async def push_reward_model(
        self, folder: Path, version: str, *, heldout_accuracy: float | None = None,
        metadata: Mapping[str, str] | None = None, activate: bool = True,
        timeout: float = 600.0, request_id: str | None = None,
    ) -> reward_pb2.PushRewardModelResponse:
        """Pushes `folder` as `version` to every replica (activating it unless told not to);
        returns the last replica's answer. A refusal is not retried (the server's checks
        decided); an unreachable replica is waited for within the client's retry budget."""
        folder = Path(folder)
        model_files(folder)  # a wrong folder fails here, before any replica is called
        response = None
        for endpoint in self.endpoints():
            stub = self.stub_to(endpoint)
            response = await self.call("PushRewardModel", lambda t, md, stub=stub: (
                stub.PushRewardModel(push_reward_model_requests(
                    folder, version, heldout_accuracy=heldout_accuracy, metadata=metadata,
                    activate=activate), timeout=t, metadata=md + self._auth)),
                address=endpoint, timeout=timeout, request_id=request_id)
        return response

    async def set_active_reward_model(
        self, version: str, *, timeout: float = 120.0, request_id: str | None = None,
    ) -> reward_pb2.SetActiveRewardModelResponse:
        """Makes a kept version active on every replica (a rollback names an older one)."""
        request = reward_pb2.SetActiveRewardModelRequest(version=version)
        response = None
        for endpoint in self.endpoints():
            stub = self.stub_to(endpoint)
            response = await self.call("SetActiveRewardModel", lambda t, md, stub=stub: (
                stub.SetActiveRewardModel(request, timeout=t, metadata=md + self._auth)),
                address=endpoint, timeout=timeout, request_id=request_id)
        return response

    async def list_reward_models(
        self, *, endpoint: str | None = None, timeout: float = 30.0,
        request_id: str | None = None,
    ) -> reward_pb2.ListRewardModelsResponse:
        """The versions kept by one replica (any, or `endpoint`) and its active one."""
        stub = self.stub if endpoint is None else self.stub_to(endpoint)
        return await self.call("ListRewardModels", lambda t, md: stub.ListRewardModels(
            reward_pb2.ListRewardModelsRequest(), timeout=t, metadata=md),
            address=endpoint, timeout=timeout, request_id=request_id)

