"""The learner's calls to the policy and reward services: rollouts, scores, adapter pushes, over
the shared clients (`rlhf.clients`).

Unavailable services are waited for with capped exponential backoff (the run reports WAITING),
never a crash; a push goes to every policy replica the address resolves to, each refusal is
recorded and retried, and the step needs `push_quorum` of them to confirm. Rollouts pin the
version they sample and are balanced over every replica; one that lacks the version (it refused
that push) passes the call on to a replica that confirmed it.

Answers are checked before the learner uses them (`check_generate`, `check_scores`): the counts
asked for, token ids and logprobs of one length within max_new_tokens, finite values. A replica
that breaks the contract fails the run with a BadAnswer naming its address and the call's request
id (which finds the call in that replica's log), never with NaN weights or an IndexError later.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

from rlhf.clients import Backoff, GaveUp, PolicyClient, PushResult, RewardClient, check_addresses
from rlhf.formats import chat_prompt, score_item, user_prompt
from rlhf.plumbing.config import ClientTLS
from rlhf.v1 import common_pb2, policy_pb2

__all__ = ["BadAnswer", "GaveUp", "PushResult", "Sample", "Services", "check_generate",
           "check_scores", "prompt_message"]
# A logprob is <= 0; float32 rounding of the policy's log-softmax can land just above.
LOGPROB_SLACK = 1e-3
# The largest score the learner takes: its rewards are float32 tensors, where a larger double
# becomes inf (and the step's losses NaN).
MAX_SCORE = 3.4028234663852886e38  # float32's largest finite value


class BadAnswer(RuntimeError):
    """A peer answered a call with something that breaks the contract."""


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str
    behaviour_logprobs: list[float]
    adapter_version: int  # 0 = base model
    adapter_sha256: str = ""  # the digest of the weights the policy says produced it
    score: float = 0.0
    truncated: bool = False  # stopped at max_new_tokens (finish reason LENGTH)
    in_loss: bool = True  # False: kept out of the loss (ppo/sampling.py, overlong filter)
    reward_version: str = ""  # the reward-model version(s) that scored it, comma-joined


def prompt_message(record) -> common_pb2.Prompt:
    """A prompt record as the policy's Prompt: its chat, or its text as one user turn."""
    return chat_prompt(record.messages) if record.messages else user_prompt(record.prompt)


class Services:
    """The policy and reward clients of one run, with the run's adapter name and hooks."""

    def __init__(self, policy_addr: list[str], reward_addr: list[str], adapter_name: str,
                 tls: ClientTLS | None = None, timeout: float = 300.0, retry_max: float = 600.0,
                 on_wait=None, on_recover=None):
        self.adapter_name = adapter_name
        # Both address lists are checked before either client opens a channel, so a bad one
        # leaves no channel open behind it.
        check_addresses(policy_addr)
        check_addresses(reward_addr)
        common = dict(timeout=timeout, backoff=Backoff(max_seconds=retry_max),
                      on_wait=on_wait, on_recover=on_recover)
        self.policy = PolicyClient(policy_addr, tls, **common)
        self.reward = RewardClient(reward_addr, tls, **common)

    async def close(self) -> None:
        """Closes every channel to both services."""
        await asyncio.gather(self.policy.close(), self.reward.close())

    async def policy_engines(self) -> set[str]:
        """The engine each policy replica runs (GetInfo.engine, e.g. "vllm 0.32.0", "fake 1.0")."""
        engines = set()
        for endpoint in self.policy.endpoints():
            info = await self.policy.get_info(endpoint=endpoint)
            engines.add(info.engine)
        return engines

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
        check_generate(resp, len(records), n, max_tokens, version, self.adapter_name,
                       f"policy at {self.policy.address}")
        samples = []
        for result in resp.results:
            served = result.served_by
            # A merged-mode replica that switched mid-request names the weights that finished.
            done = result.finished_by if result.HasField("finished_by") else served
            version = (served.adapter.version
                       if not served.base and served.adapter.name == self.adapter_name else 0)
            for c in result.completions:
                samples.append(Sample(
                    prompt_index=result.prompt_index, prompt_ids=list(result.prompt_token_ids),
                    completion_ids=list(c.token_ids), completion_text=c.text,
                    behaviour_logprobs=list(c.logprobs), adapter_version=version,
                    adapter_sha256=done.sha256,
                    truncated=c.finish_reason == policy_pb2.FINISH_REASON_LENGTH,
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
        response = await self.reward.score_response(items)
        scores = check_scores(response, len(items), f"reward at {self.reward.address}")
        version = ",".join(response.model_versions)
        for s in samples:
            s.reward_version = version
        return scores

    async def push(self, folder: Path, version: int, base_model_id: str, token: str | None,
                   quorum: float, attempts: int = 5,
                   base_model_fingerprint: str = "") -> PushResult:
        """Pushes to every replica; returns once `quorum` of them confirmed (the others are
        recorded), or raises GaveUp. Refusals are retried `attempts` times; while the quorum is
        not met because replicas are unreachable (restarting), the run waits for them up to
        retry_max seconds, like every other call to a service."""
        return await self.policy.push(folder, self.adapter_name, version, base_model_id,
                                      token=token, quorum=quorum, attempts=attempts,
                                      base_model_fingerprint=base_model_fingerprint)

    async def stage(self, folder: Path, version: int, base_model_id: str, token: str | None,
                    quorum: float, stage_seconds: int,
                    base_model_fingerprint: str = "") -> PushResult:
        """Stages `version` on every replica (loaded, not active); with fewer than `quorum` of
        them staged, the staged copies are dropped and GaveUp raised (no replica activates
        it). Then `commit` activates it, or `keep` leaves it inactive."""
        return await self.policy.stage_and_commit(
            folder, self.adapter_name, version, base_model_id, token=token, quorum=quorum,
            stage_seconds=stage_seconds, commit=False,
            base_model_fingerprint=base_model_fingerprint)

    async def commit(self, result: PushResult, token: str | None) -> None:
        """Activates a staged version on the replicas that staged it; result.missed names
        those that still refused after the bounded retries."""
        await self.policy.commit(result, self.adapter_name, token=token)

    async def keep(self, result: PushResult, token: str | None) -> dict[str, str]:
        """Leaves a staged version inactive on its replicas, past its stage deadline (the next
        rollouts are pinned to it)."""
        return await self.policy.keep(self.adapter_name, result.version, result.confirmed,
                                      token=token)


def check_generate(resp: policy_pb2.GenerateResponse, prompts: int, n: int, max_tokens: int,
                   version: int, adapter_name: str, peer: str) -> None:
    """BadAnswer unless `resp` holds one result per prompt (each index once), `n` completions
    each, token ids and finite logprobs of one length within `max_tokens`, from `version` of
    the adapter or an older one."""
    where = f"{peer} answered Generate (request id {resp.request_id or '-'}) with"
    if len(resp.results) != prompts:
        raise BadAnswer(f"{where} {len(resp.results)} results for {prompts} prompts")
    seen = set()
    for result in resp.results:
        index = result.prompt_index
        if index >= prompts or index in seen:
            raise BadAnswer(f"{where} prompt_index {index} (out of range or repeated)")
        seen.add(index)
        if not result.prompt_token_ids:
            raise BadAnswer(f"{where} no prompt token ids for prompt {index}")
        served = result.served_by
        served_version = 0 if served.base else served.adapter.version
        if not served.base and (served.adapter.name != adapter_name or served_version > version):
            raise BadAnswer(f"{where} prompt {index} served by {served.adapter.name}@v"
                            f"{served_version}; asked for {adapter_name}@v{version}")
        if len(result.completions) != n:
            raise BadAnswer(f"{where} {len(result.completions)} completions for prompt {index}; "
                            f"asked for {n}")
        for c in result.completions:
            what = f"prompt {index} completion {c.index}"
            if len(c.token_ids) > max_tokens:
                raise BadAnswer(f"{where} {len(c.token_ids)} tokens in {what}; asked for at most "
                                f"{max_tokens}")
            if len(c.logprobs) != len(c.token_ids):
                raise BadAnswer(f"{where} {len(c.logprobs)} logprobs for {len(c.token_ids)} "
                                f"tokens in {what}")
            bad = next((lp for lp in c.logprobs
                        if not math.isfinite(lp) or lp > LOGPROB_SLACK), None)
            if bad is not None:
                raise BadAnswer(f"{where} logprob {bad} in {what} (a logprob is finite and <= 0)")


def check_scores(resp, items: int, peer: str) -> list[float]:
    """The scores of a ScoreResponse, or BadAnswer unless there is one finite score per item,
    within the float32 range the learner computes in (+-MAX_SCORE)."""
    where = f"{peer} answered Score (request id {resp.request_id or '-'}) with"
    scores = [s.score for s in resp.scores]
    if len(scores) != items:
        raise BadAnswer(f"{where} {len(scores)} scores for {items} items")
    bad = next((i for i, v in enumerate(scores) if not math.isfinite(v)), None)
    if bad is not None:
        raise BadAnswer(f"{where} score {scores[bad]} for item {bad} (a score must be finite)")
    bad = next((i for i, v in enumerate(scores) if abs(v) > MAX_SCORE), None)
    if bad is not None:
        raise BadAnswer(f"{where} score {scores[bad]} for item {bad}, beyond the learner's "
                        f"float32 range (+-{MAX_SCORE:.3g}), where it would be infinite")
    return scores
