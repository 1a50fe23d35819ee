"""Typed client of the policy service (`rlhf.v1.PolicyService`): Generate balanced over every
replica, adapter pushes to each replica with a quorum, adapter listing and service info.

A staged push (`stage_and_commit`) is all or nothing: the version is staged on every replica
(received, sha256 checked, loaded, not active); with fewer than the quorum staged, the staged
copies are dropped and no replica activates it; else it is activated on every replica that
staged it, and a replica that misses the activation is tried again (bounded) and reported.

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
from rlhf.clients.push import PushResult, adapter_digest, admin_metadata, push_adapter
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
# Tries of each replica's activation in a commit, and of a drop of a staged copy.
COMMIT_ATTEMPTS = 4


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

    async def get_info(self, *, endpoint: str | None = None, timeout: float = 30.0,
                       request_id: str | None = None,
                       ) -> policy_pb2.PolicyServiceGetInfoResponse:
        """What a replica (one of them, or `endpoint`) serves and its limits."""
        stub = self.stub if endpoint is None else self.stub_to(endpoint)
        return await self.call("GetInfo", lambda t, md: stub.GetInfo(
            policy_pb2.PolicyServiceGetInfoRequest(), timeout=t, metadata=md),
            address=endpoint, timeout=timeout, request_id=request_id)

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
        result, targets = await self._push_all(
            folder, name, version, base_model_id, token=token, activate=activate,
            attempts=attempts, timeout=timeout, request_id=request_id,
            base_model_fingerprint=base_model_fingerprint, need_share=quorum)
        if len(result.confirmed) < quorum * len(targets):
            raise GaveUp(
                f"adapter {name} v{version} confirmed by {len(result.confirmed)} of "
                f"{len(targets)} policy replicas at {self.address} (quorum {quorum}); "
                f"refusals: {result.refused}", service=self.service, address=self.address,
                details=str(result.refused))
        self._remember(name, version, result.confirmed)
        return result

    async def stage_and_commit(self, folder: Path, name: str, version: int, base_model_id: str,
                               *, token: str | None = None, quorum: float = 1.0,
                               stage_seconds: int = 600, decide=None, commit: bool = True,
                               attempts: int = 5, timeout: float = 120.0,
                               request_id: str | None = None,
                               base_model_fingerprint: str = "") -> PushResult:
        """Stages the version on every replica, then activates it on all that staged it.

        Fewer than `quorum` (a share) staged: the staged copies are dropped and GaveUp is
        raised; no replica activated it. `decide` (an async callable taking the PushResult and
        returning whether to activate, e.g. an evaluation of the staged version pinned) runs
        between the two phases; False drops nothing and activates nothing: the caller keeps
        (`keep`) or drops (`drop`) the staged version. `commit=False` stops after staging (a
        canary takes over; the replicas drop the version unless it is activated within
        `stage_seconds`). Replicas that miss the activation are tried COMMIT_ATTEMPTS times,
        then named in `missed`."""
        result, targets = await self._push_all(
            folder, name, version, base_model_id, token=token, activate=False,
            attempts=attempts, timeout=timeout, request_id=request_id,
            base_model_fingerprint=base_model_fingerprint, stage_seconds=stage_seconds,
            need_share=quorum)
        result.sha256 = await asyncio.to_thread(adapter_digest, folder)
        if len(result.confirmed) < quorum * len(targets):
            dropped = await self.drop(name, version, result.confirmed, token=token)
            raise GaveUp(
                f"adapter {name} v{version} staged by {len(result.confirmed)} of {len(targets)} "
                f"policy replicas at {self.address} (quorum {quorum}), so no replica activates "
                f"it; staged copies dropped on {len(dropped)} of {len(result.confirmed)}; "
                f"refusals: {result.refused}", service=self.service, address=self.address,
                details=str(result.refused))
        self._remember(name, version, result.confirmed)
        if not commit or (decide is not None and not await decide(result)):
            return result
        await self.commit(result, name, token=token)
        return result

    async def commit(self, result: PushResult, name: str, *, token: str | None = None) -> None:
        """Activates `result.version` on every replica that staged it (`result.confirmed`),
        each tried COMMIT_ATTEMPTS times; fills result.activated and result.missed."""
        request = policy_pb2.SetActiveAdapterRequest(
            adapter=policy_pb2.AdapterRef(name=name, version=result.version))
        outcomes = await asyncio.gather(*(
            self._admin_call(ep, "SetActiveAdapter", request, token) for ep in result.confirmed))
        for endpoint, error in zip(result.confirmed, outcomes, strict=True):
            if error is None:
                result.activated.append(endpoint)
                result.missed.pop(endpoint, None)
            else:
                result.missed[endpoint] = error

    async def drop(self, name: str, version: int, endpoints: list[str], *,
                   token: str | None = None) -> list[str]:
        """Drops a staged (inactive) version on `endpoints`; returns those that no longer keep
        it. A replica that cannot be reached drops it by itself at its stage deadline."""
        request = policy_pb2.DropAdapterRequest(
            adapter=policy_pb2.AdapterRef(name=name, version=version))
        outcomes = await asyncio.gather(*(
            self._admin_call(ep, "DropAdapter", request, token) for ep in endpoints))
        self._holders.pop((name, version), None)
        return [ep for ep, error in zip(endpoints, outcomes, strict=True) if error is None]

    async def keep(self, name: str, version: int, endpoints: list[str], *,
                   token: str | None = None) -> dict[str, str]:
        """Ends the staging of a version on `endpoints` without activating it (it stays
        servable pinned, e.g. for the learner's next rollouts); returns the failures."""
        request = policy_pb2.KeepAdapterRequest(
            adapter=policy_pb2.AdapterRef(name=name, version=version))
        outcomes = await asyncio.gather(*(
            self._admin_call(ep, "KeepAdapter", request, token) for ep in endpoints))
        return {ep: error for ep, error in zip(endpoints, outcomes, strict=True) if error}

    async def _admin_call(self, endpoint: str, method: str, request, token: str | None,
                          attempts: int = COMMIT_ATTEMPTS, timeout: float = 30.0) -> str | None:
        """One admin call to one replica, tried `attempts` times; None or the last error."""
        delays = Backoff(max_seconds=self.backoff.max_seconds, initial=0.2).delays()
        metadata = admin_metadata(token) + ((REQUEST_ID_KEY, new_request_id()),)
        error = ""
        for attempt in range(attempts):
            channel = self.open_channel(endpoint)
            try:
                await getattr(policy_pb2_grpc.PolicyServiceStub(channel), method)(
                    request, timeout=timeout, metadata=metadata)
                return None
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.INVALID_ARGUMENT):
                    return error  # the same call is refused again
            finally:
                await channel.close()
            if attempt + 1 < attempts:
                await asyncio.sleep(next(delays))
        return error

    async def _push_all(self, folder: Path, name: str, version: int, base_model_id: str, *,
                        token: str | None, activate: bool, attempts: int, timeout: float,
                        request_id: str | None, base_model_fingerprint: str,
                        need_share: float, stage_seconds: int = 0,
                        ) -> tuple[PushResult, list[str]]:
        """The push to every replica with its retries; the outcome per replica, and them."""
        targets = self.endpoints()
        need = need_share * len(targets)
        result = PushResult(version)
        pending = list(targets)
        delays = Backoff(max_seconds=self.backoff.max_seconds, initial=0.5).delays()
        deadline = time.monotonic() + self.backoff.max_seconds
        metadata = ((REQUEST_ID_KEY, request_id or new_request_id()),)
        attempt, waited = 0, False
        while pending:
            outcomes = await asyncio.gather(*(
                self._push_one(ep, folder, name, version, base_model_id, token, activate,
                               timeout, metadata, base_model_fingerprint, stage_seconds)
                for ep in pending))
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
        if waited:
            self.report_recover()
        return result, targets

    async def _push_one(self, endpoint: str, folder: Path, name: str, version: int,
                        base_model_id: str, token: str | None, activate: bool, timeout: float,
                        metadata: Metadata, base_model_fingerprint: str = "",
                        stage_seconds: int = 0) -> str | None:
        # A fresh channel per attempt: a replica that restarts is dialled again at once, not
        # after a kept channel's reconnect backoff.
        channel = self.open_channel(endpoint)
        try:
            await push_adapter(channel, folder, name, version, base_model_id, token=token,
                               activate=activate, timeout=timeout, metadata=metadata,
                               base_model_fingerprint=base_model_fingerprint,
                               stage_seconds=stage_seconds)
            return None
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        finally:
            await channel.close()

    def _remember(self, name: str, version: int, confirmed: list[str]) -> None:
        self._holders[(name, version)] = list(confirmed)
        while len(self._holders) > _REMEMBERED:
            del self._holders[next(iter(self._holders))]
