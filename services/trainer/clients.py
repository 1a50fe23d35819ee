"""The learner's calls to the policy and reward services: rollouts, scores, adapter pushes, over
the shared clients (`rlhf.clients`).

Unavailable services are waited for with capped exponential backoff (the run reports WAITING),
never a crash; a push goes to every policy replica the address resolves to, each refusal is
recorded and retried, and the step needs `push_quorum` of them to confirm. Rollouts pin the
version they sample and are balanced over every replica; one that lacks the version (it refused
that push) passes the call on to a replica that confirmed it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from rlhf.clients import Backoff, GaveUp, PolicyClient, PushResult, RewardClient
from rlhf.formats import chat_prompt, score_item, user_prompt
from rlhf.plumbing.config import ClientTLS
from rlhf.v1 import common_pb2, policy_pb2

__all__ = ["GaveUp", "PushResult", "Sample", "Services", "prompt_message"]


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str
    behaviour_logprobs: list[float]
    adapter_version: int  # 0 = base model
    score: float = 0.0


def prompt_message(record) -> common_pb2.Prompt:
    """A prompt record as the policy's Prompt: its chat, or its text as one user turn."""
    return chat_prompt(record.messages) if record.messages else user_prompt(record.prompt)


class Services:
    """The policy and reward clients of one run, with the run's adapter name and hooks."""

    def __init__(self, policy_addr: list[str], reward_addr: list[str], adapter_name: str,
                 tls: ClientTLS | None = None, timeout: float = 300.0, retry_max: float = 600.0,
                 on_wait=None, on_recover=None):
        self.adapter_name = adapter_name
        common = dict(timeout=timeout, backoff=Backoff(max_seconds=retry_max),
                      on_wait=on_wait, on_recover=on_recover)
        self.policy = PolicyClient(policy_addr, tls, **common)
        self.reward = RewardClient(reward_addr, tls, **common)

    async def close(self) -> None:
        """Closes every channel to both services."""
        await asyncio.gather(self.policy.close(), self.reward.close())

    async def newest_version(self) -> int:
        """The newest version of this run's adapter name any replica has accepted (0 if none),
        evicted ones included: a replica never takes a version number twice."""
        newest = 0
        for endpoint in self.policy.endpoints():
            listed = await self.policy.list_adapters(self.adapter_name, endpoint=endpoint)
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
        resp = await self.policy.generate(request)
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
                ))
        return samples

    async def score(self, records, samples: list[Sample]) -> list[float]:
        items = []
        for s in samples:
            record = records[s.prompt_index]
            reference = record.meta.get("reference", record.meta.get("answer", ""))
            # The reward service refuses an empty completion; a lone space scores as empty.
            items.append(score_item(s.completion_text or " ", prompt=record.prompt or "",
                                    messages=record.messages or (), reference=str(reference)))
        return await self.reward.score(items)

    async def push(self, folder: Path, version: int, base_model_id: str, token: str | None,
                   quorum: float, attempts: int = 5) -> PushResult:
        """Pushes to every replica; returns once `quorum` of them confirmed (the others are
        recorded), or raises GaveUp. Refusals are retried `attempts` times; while the quorum is
        not met because replicas are unreachable (restarting), the run waits for them up to
        retry_max seconds, like every other call to a service."""
        return await self.policy.push(folder, self.adapter_name, version, base_model_id,
                                      token=token, quorum=quorum, attempts=attempts)
