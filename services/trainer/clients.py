"""The learner's calls to the policy and reward services: rollouts, scores, adapter pushes.

Unavailable services are waited for with capped exponential backoff (the run reports WAITING),
never a crash; a push goes to every policy replica the address resolves to, each refusal is
recorded and retried, and the step needs `push_quorum` of them to confirm.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from rlhf.adapter_push import push_adapter
from rlhf.plumbing.channel import endpoints, make_channel
from rlhf.plumbing.config import ClientTLS
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc

log = logging.getLogger("rlhf.trainer.clients")

# Worth waiting for: the service is down, restarting, overloaded or slow right now.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


class GaveUp(RuntimeError):
    """A service stayed unavailable for longer than retry_max_seconds."""


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str
    behaviour_logprobs: list[float]
    adapter_version: int  # 0 = base model
    finish_reason: int
    score: float = 0.0


@dataclass
class PushResult:
    version: int
    confirmed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


# Refusals that mean "not reachable right now" rather than "this adapter is refused".
_WAIT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


async def with_retry(what: str, call: Callable[[], Awaitable], max_seconds: float,
                     on_wait: Callable[[str], None] | None = None,
                     on_recover: Callable[[], None] | None = None):
    delay, start, waited = 0.25, time.monotonic(), False
    while True:
        try:
            result = await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE:
                raise
            if time.monotonic() - start > max_seconds:
                raise GaveUp(f"{what}: still {exc.code().name} after {max_seconds:.0f}s: "
                             f"{exc.details()}") from exc
            message = f"{what}: {exc.code().name} ({exc.details()}); retrying in {delay:.1f}s"
            log.warning(message)
            if on_wait is not None:
                on_wait(message)
            waited = True
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, 10.0)
            continue
        if waited and on_recover is not None:
            on_recover()
        return result


def prompt_message(record) -> common_pb2.Prompt:
    if record.messages:
        return common_pb2.Prompt(chat=common_pb2.ChatConversation(messages=[
            common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in record.messages
        ]))
    return common_pb2.Prompt(chat=common_pb2.ChatConversation(messages=[
        common_pb2.ChatMessage(role="user", content=record.prompt)
    ]))


class Services:
    def __init__(self, policy_addr: list[str], reward_addr: list[str], adapter_name: str,
                 tls: ClientTLS | None = None, timeout: float = 300.0, retry_max: float = 600.0,
                 on_wait=None, on_recover=None):
        self.policy_addr = policy_addr
        self.adapter_name = adapter_name
        self.tls = tls
        self.timeout = timeout
        self.retry_max = retry_max
        self.on_wait, self.on_recover = on_wait, on_recover
        self.policy = policy_pb2_grpc.PolicyServiceStub(make_channel(policy_addr, tls))
        # Rollouts pin an adapter version, so they go only to replicas that confirmed it (all of
        # them normally; the quorum when some refused).
        self.rollout_stub = self.policy
        self.reward = reward_pb2_grpc.RewardServiceStub(make_channel(reward_addr, tls))

    async def _retry(self, what, call):
        return await with_retry(what, call, self.retry_max, self.on_wait, self.on_recover)

    async def base_model_id(self) -> str:
        info = await self._retry("policy GetInfo", lambda: self.policy.GetInfo(
            policy_pb2.PolicyServiceGetInfoRequest(), timeout=30))
        return info.base_model_id

    async def newest_version(self) -> int:
        """The newest version of this run's adapter name any replica has accepted (0 if none),
        evicted ones included: a replica never takes a version number twice."""
        newest = 0
        for endpoint in endpoints(self.policy_addr):
            stub = policy_pb2_grpc.PolicyServiceStub(make_channel(endpoint, self.tls))
            listed = await self._retry(f"policy ListAdapters on {endpoint}", lambda s=stub: (
                s.ListAdapters(policy_pb2.ListAdaptersRequest(name=self.adapter_name),
                               timeout=30)))
            newest = max([newest, listed.next_version - 1,
                          *(a.adapter.version for a in listed.adapters)])
        return newest

    async def generate(self, records, n: int, max_tokens: int, temperature: float,
                       seed: int, version: int) -> list[Sample]:
        """Samples from exactly `version` of the run's adapter (pinned, so a concurrent push
        can't change which weights answer)."""
        request = policy_pb2.GenerateRequest(
            prompts=[prompt_message(r) for r in records],
            params=policy_pb2.SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature,
                                             seed=seed, logprobs=True),
            adapter=policy_pb2.AdapterSelector(
                target=policy_pb2.ADAPTER_TARGET_PINNED,
                pinned=policy_pb2.AdapterRef(name=self.adapter_name, version=version)),
        )
        resp = await self._retry("policy Generate", lambda: self.rollout_stub.Generate(
            request, timeout=self.timeout))
        samples = []
        for result in resp.results:
            served = result.served_by
            version = (served.adapter.version
                       if not served.base and served.adapter.name == self.adapter_name else 0)
            for c in result.completions:
                samples.append(Sample(
                    prompt_index=result.prompt_index, prompt_ids=list(result.prompt_token_ids),
                    completion_ids=list(c.token_ids), completion_text=c.text,
                    behaviour_logprobs=list(c.logprobs), adapter_version=version,
                    finish_reason=c.finish_reason,
                ))
        return samples

    async def score(self, records, samples: list[Sample]) -> list[float]:
        items = []
        for s in samples:
            record = records[s.prompt_index]
            reference = record.meta.get("reference", record.meta.get("answer", ""))
            item = reward_pb2.ScoreItem(completion=s.completion_text or " ",
                                        reference=str(reference))
            if record.messages:
                item.prompt_messages.extend(common_pb2.ChatMessage(role=m["role"],
                                                                   content=m["content"])
                                            for m in record.messages)
            else:
                item.prompt = record.prompt
            items.append(item)
        resp = await self._retry("reward Score", lambda: self.reward.Score(
            reward_pb2.ScoreRequest(items=items), timeout=self.timeout))
        return [s.score for s in resp.scores]

    async def push(self, folder: Path, version: int, base_model_id: str, token: str | None,
                   quorum: float, attempts: int = 5) -> PushResult:
        """Pushes to every replica; returns once `quorum` of them confirmed (the others are
        recorded), or raises GaveUp. Refusals are retried `attempts` times; while the quorum is
        not met because replicas are unreachable (restarting), the run waits for them up to
        retry_max seconds, like every other call to a service."""
        targets = endpoints(self.policy_addr)
        result = PushResult(version)
        pending = list(targets)
        delay, deadline, attempt, waited = 0.5, time.monotonic() + self.retry_max, 0, False
        while pending:
            outcomes = await asyncio.gather(*(self._push_one(ep, folder, version, base_model_id,
                                                             token) for ep in pending))
            still = []
            for ep, error in zip(pending, outcomes, strict=True):
                if error is None:
                    result.confirmed.append(ep)
                    result.refused.pop(ep, None)
                else:
                    result.refused[ep] = error
                    still.append(ep)
            pending, attempt = still, attempt + 1
            if not pending:
                break
            quorum_met = len(result.confirmed) >= quorum * len(targets)
            unreachable = all(result.refused[ep].startswith(_WAIT_CODES) for ep in pending)
            if attempt >= attempts and (quorum_met or not unreachable):
                break
            if time.monotonic() + delay > deadline:
                break
            if not quorum_met and unreachable and attempt >= attempts:
                message = (f"policy push v{version}: {len(pending)} replica(s) unreachable "
                           f"({'; '.join(result.refused[ep] for ep in pending)}); waiting")
                log.warning(message)
                if self.on_wait is not None:
                    self.on_wait(message)
                waited = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        if waited and self.on_recover is not None \
                and len(result.confirmed) >= quorum * len(targets):
            self.on_recover()
        if len(result.confirmed) < quorum * len(targets):
            raise GaveUp(f"adapter v{version} confirmed by {len(result.confirmed)} of "
                         f"{len(targets)} replicas (quorum {quorum}); refusals: {result.refused}")
        self.rollout_stub = (self.policy if not result.refused else
                             policy_pb2_grpc.PolicyServiceStub(make_channel(result.confirmed,
                                                                            self.tls)))
        return result

    async def _push_one(self, endpoint: str, folder: Path, version: int, base_model_id: str,
                        token: str | None) -> str | None:
        channel = make_channel(endpoint, self.tls)
        try:
            await push_adapter(channel, folder, self.adapter_name, version, base_model_id,
                               token=token, timeout=120)
            return None
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        finally:
            await channel.close()
