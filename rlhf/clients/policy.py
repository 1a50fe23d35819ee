"""Typed client of the policy service (`rlhf.v1.PolicyService`): Generate balanced over every
replica, adapter pushes to each replica with a quorum, adapter listing and service info.

Generate pinned to a version this client pushed also succeeds while some replica refused that
version: a replica that answers NOT_FOUND or FAILED_PRECONDITION sends the call on to a replica
that confirmed it. A push always goes to every replica, so one that refused a version is pushed
the next one like the others."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from rlhf.clients.base import Metadata, ServiceClient, new_request_id
from rlhf.clients.errors import GaveUp, call_failed, start_hint
from rlhf.clients.push import PushResult, push_adapter
from rlhf.clients.retry import Backoff
from rlhf.plumbing.interceptors import REQUEST_ID_KEY
from rlhf.v1 import policy_pb2, policy_pb2_grpc

# What a replica answers when it does not hold the pinned version asked for (never received it,
# refused it, or serves only its active version in merged mode).
_NOT_HERE = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
# Push outcomes that mean "not reachable right now" rather than "this adapter is refused".
_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
# Pushed versions whose confirming replicas are remembered for pinned Generate calls.
_REMEMBERED = 16


class PolicyClient(ServiceClient):
    service = "policy"
    stub_class = policy_pb2_grpc.PolicyServiceStub

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._holders: dict[tuple[str, int], list[str]] = {}
        self._turn = 0

    # ---- serving -----------------------------------------------------------------------------

    async def generate(self, request: policy_pb2.GenerateRequest, *,
                       timeout: float | None = None,
                       request_id: str | None = None) -> policy_pb2.GenerateResponse:
        return await self.call("Generate", lambda t, md: self._generate_once(request, t, md),
                               timeout=timeout, request_id=request_id)

    async def _generate_once(self, request: policy_pb2.GenerateRequest, timeout: float,
                             metadata: Metadata) -> policy_pb2.GenerateResponse:
        try:
            return await self.stub.Generate(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            holders = self.holders_of(request.adapter) if exc.code() in _NOT_HERE else []
            if not holders:
                raise
            error = exc
        self._turn += 1
        for i in range(len(holders)):
            endpoint = holders[(self._turn + i) % len(holders)]
            try:
                return await self.stub_to(endpoint).Generate(request, timeout=timeout,
                                                             metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                error = exc
        raise error

    async def generate_stream(self, request: policy_pb2.GenerateStreamRequest, *,
                              timeout: float | None = None, request_id: str | None = None,
                              ) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        """The stream's first message is awaited here, so a failure to start raises CallFailed
        before the caller has sent anything of its own; a later failure raises it from the
        iteration. Ending the iteration early cancels the call."""
        started: list = []

        async def first(t: float, md: Metadata):
            call = self.stub.GenerateStream(request, timeout=t, metadata=md)
            try:
                message = await call.read()
            except BaseException:
                call.cancel()
                raise
            started.append(call)
            return message

        message = await self.call("GenerateStream", first, timeout=timeout,
                                  request_id=request_id)
        return self._rest_of_stream(started[0], message)

    async def _rest_of_stream(self, call, first) -> AsyncIterator[
            policy_pb2.GenerateStreamResponse]:
        try:
            message = first
            while message is not grpc.aio.EOF:
                yield message
                try:
                    message = await call.read()
                except grpc.aio.AioRpcError as exc:
                    raise call_failed(self.service, self.address, "GenerateStream",
                                      exc) from exc
        finally:
            call.cancel()

    # ---- information -------------------------------------------------------------------------

    async def get_info(self, *, timeout: float = 30.0, request_id: str | None = None,
                       ) -> policy_pb2.PolicyServiceGetInfoResponse:
        return await self.call("GetInfo", lambda t, md: self.stub.GetInfo(
            policy_pb2.PolicyServiceGetInfoRequest(), timeout=t, metadata=md),
            timeout=timeout, request_id=request_id)

    async def list_adapters(self, name: str = "", *, endpoint: str | None = None,
                            timeout: float = 30.0, request_id: str | None = None,
                            ) -> policy_pb2.ListAdaptersResponse:
        """Adapters kept by a replica (one of them, or `endpoint`), of `name` or all."""
        stub = self.stub if endpoint is None else self.stub_to(endpoint)
        return await self.call("ListAdapters", lambda t, md: stub.ListAdapters(
            policy_pb2.ListAdaptersRequest(name=name), timeout=t, metadata=md),
            address=endpoint, timeout=timeout, request_id=request_id)

    def holders_of(self, selector: policy_pb2.AdapterSelector) -> list[str]:
        """Replicas that confirmed the pinned version `selector` asks for, when this client
        pushed it; else none."""
        if selector.target != policy_pb2.ADAPTER_TARGET_PINNED:
            return []
        return list(self._holders.get((selector.pinned.name, selector.pinned.version), ()))

    # ---- pushes ------------------------------------------------------------------------------

    async def push(self, folder: Path, name: str, version: int, base_model_id: str, *,
                   token: str | None = None, activate: bool = True, quorum: float = 1.0,
                   attempts: int = 5, timeout: float = 120.0,
                   request_id: str | None = None, base_model_fingerprint: str = "") -> PushResult:
        """Pushes to every replica; returns once `quorum` (a share) of them confirmed, the
        others' refusals recorded, or raises GaveUp.

        A refusal is tried again `attempts` times in all. While the quorum is short because
        replicas are unreachable (restarting), they are waited for (on_wait is told) up to the
        client's retry budget, like any other call. `base_model_fingerprint`
        (rlhf.formats.base_model_fingerprint of the trainer's own model) lets the replicas refuse
        an adapter of another model whose folder has the same name."""
        targets = self.endpoints()
        need = quorum * len(targets)
        result = PushResult(version)
        pending = list(targets)
        delays = Backoff(max_seconds=self.backoff.max_seconds, initial=0.5).delays()
        deadline = time.monotonic() + self.backoff.max_seconds
        metadata = ((REQUEST_ID_KEY, request_id or new_request_id()),)
        attempt, waited = 0, False
        while pending:
            outcomes = await asyncio.gather(*(
                self._push_one(ep, folder, name, version, base_model_id, token, activate,
                               timeout, metadata, base_model_fingerprint) for ep in pending))
            still = []
            for endpoint, error in zip(pending, outcomes, strict=True):
                if error is None:
                    result.confirmed.append(endpoint)
                    result.refused.pop(endpoint, None)
                else:
                    result.refused[endpoint] = error
                    still.append(endpoint)
            pending, attempt = still, attempt + 1
            if not pending:
                break
            quorum_met = len(result.confirmed) >= need
            unreachable = all(result.refused[ep].startswith(_UNREACHABLE) for ep in pending)
            if attempt >= attempts and (quorum_met or not unreachable):
                break
            delay = next(delays)
            if time.monotonic() + delay > deadline:
                break
            if attempt >= attempts:
                self.report_wait(
                    f"policy push {name} v{version}: {len(pending)} replica(s) unreachable "
                    f"({'; '.join(f'{ep} {result.refused[ep]}' for ep in pending)}); waiting "
                    f"({start_hint(self.service, pending)})")
                waited = True
            await asyncio.sleep(delay)
        if len(result.confirmed) < need:
            raise GaveUp(
                f"adapter {name} v{version} confirmed by {len(result.confirmed)} of "
                f"{len(targets)} policy replicas at {self.address} (quorum {quorum}); "
                f"refusals: {result.refused}", service=self.service, address=self.address,
                details=str(result.refused))
        if waited:
            self.report_recover()
        self._remember(name, version, result.confirmed)
        return result

    async def _push_one(self, endpoint: str, folder: Path, name: str, version: int,
                        base_model_id: str, token: str | None, activate: bool, timeout: float,
                        metadata: Metadata, base_model_fingerprint: str = "") -> str | None:
        # A fresh channel per attempt: a replica that restarts is dialled again at once, not
        # after a kept channel's reconnect backoff.
        channel = self.open_channel(endpoint)
        try:
            await push_adapter(channel, folder, name, version, base_model_id, token=token,
                               activate=activate, timeout=timeout, metadata=metadata,
                               base_model_fingerprint=base_model_fingerprint)
            return None
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        finally:
            await channel.close()

    def _remember(self, name: str, version: int, confirmed: list[str]) -> None:
        self._holders[(name, version)] = list(confirmed)
        while len(self._holders) > _REMEMBERED:
            del self._holders[next(iter(self._holders))]
