"""Sampling and ranking shared by every endpoint: request fields to the policy's contract, and
best-of-n = sample n, score each (prompt, completion) with the reward service, order by score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.budgets import text_tokens
from gateway.errors import APIError
from gateway.upstream import Upstreams
from rlhf import formats
from rlhf.formats import wire_role
from rlhf.v1 import common_pb2, policy_pb2, reward_pb2

FINISH = {policy_pb2.FINISH_REASON_STOP: "stop", policy_pb2.FINISH_REASON_LENGTH: "length"}


def finish_reason(value: int) -> str:
    return FINISH.get(value, "stop")


def check_n(n: int, limit: int, param: str = "n") -> None:
    if n > limit:
        raise APIError(400, f"{param} is {n}; this gateway allows at most {limit}",
                       "invalid_request", param)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 8 or any(not s for s in stops):
        raise APIError(400, "stop takes 1 to 8 non-empty strings", "invalid_request", "stop")
    return stops


def sampling(n: int, max_tokens: int, temperature: float, top_p: float, seed: int | None,
             stop: Sequence[str] = (), presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0) -> policy_pb2.SamplingParams:
    params = policy_pb2.SamplingParams(
        n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=list(stop),
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    if seed is not None:
        params.seed = seed
    return params


def chat_prompt(messages: Sequence[tuple[str, str]]) -> common_pb2.Prompt:
    """(role, content) turns of a request, OpenAI's role aliases mapped to the wire's roles."""
    return formats.chat_prompt({"role": wire_role(role), "content": content}
                               for role, content in messages)


def prompt_as_text(prompt: common_pb2.Prompt) -> str:
    """The prompt as one string, for the feedback store and exports."""
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return prompt.text
    if kind == "chat":
        return "\n".join(f"{m.role}: {m.content}" for m in prompt.chat.messages)
    return " ".join(str(i) for i in prompt.token_ids.ids)


# Tokens a chat template adds around each turn (role markers, separators): a guess for the
# up-front charge, which is settled to the policy's count afterwards.
CHAT_TURN_TOKENS = 4


def estimated_tokens(prompt: common_pb2.Prompt) -> int:
    """The prompt's tokens before the policy counts them: exact for token ids, else a guess."""
    kind = prompt.WhichOneof("kind")
    if kind == "token_ids":
        return len(prompt.token_ids.ids)
    if kind == "chat":
        return sum(text_tokens(m.content) + CHAT_TURN_TOKENS for m in prompt.chat.messages)
    return text_tokens(prompt.text)


def work(prompts: Sequence[common_pb2.Prompt], draws: int, max_tokens: int) -> tuple[int, int]:
    """(sequences, tokens) a request is charged: every prompt sampled `draws` times, and the
    prompts' tokens plus `max_tokens` per sequence."""
    sequences = len(prompts) * draws
    return sequences, sum(estimated_tokens(p) for p in prompts) + sequences * max_tokens


def used_tokens(usage: common_pb2.Usage) -> int:
    return usage.prompt_tokens + usage.completion_tokens


def score_item(prompt: common_pb2.Prompt, completion: str) -> reward_pb2.ScoreItem:
    """The reward service's item for a completion of `prompt` (token ids are sent as text)."""
    if prompt.WhichOneof("kind") == "chat":
        return formats.score_item(completion, messages=[
            {"role": m.role, "content": m.content} for m in prompt.chat.messages])
    return formats.score_item(completion, prompt=prompt_as_text(prompt))


def rank(scores: Sequence[float | None]) -> list[int]:
    """Indices from the highest score down; unscored (None) last; ties keep generation order, so
    a ranking is reproducible for the same scores."""
    return sorted(range(len(scores)),
                  key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))


@dataclass
class Ranked:
    result: policy_pb2.PromptResult
    scores: list[float | None]  # None: an empty completion, which the reward service refuses
    order: list[int]  # indices into result.completions, best first
    reward_model_versions: list[str]  # of the reward service's versioned scorers; may be empty


async def sample(upstreams: Upstreams, prompts: Sequence[common_pb2.Prompt],
                 params: policy_pb2.SamplingParams, selector: policy_pb2.AdapterSelector,
                 request_id: str, ranked: bool = False) -> policy_pb2.GenerateResponse:
    """`ranked`: the caller scores the answers with score_all (which hands the scores to a
    running canary); otherwise the canary scores a share of them itself."""
    request = policy_pb2.GenerateRequest(prompts=list(prompts), params=params, adapter=selector)
    if upstreams.canary is not None:
        return await upstreams.canary.generate(request, request_id, ranked)
    return await upstreams.generate(request, request_id)


async def score_all(upstreams: Upstreams, prompts: Sequence[common_pb2.Prompt],
                    response: policy_pb2.GenerateResponse, request_id: str,
                    canary: bool = True) -> list[Ranked]:
    """Scores every non-empty completion of every prompt in one Score call and ranks each
    prompt's. An empty completion (the model stopped at once) is not scored: it ranks last. One
    call is scored by one set of reward-model versions, which each Ranked names."""
    items, where = [], []
    for k, r in enumerate(response.results):
        for i, c in enumerate(r.completions):
            if c.text:
                items.append(score_item(prompts[r.prompt_index], c.text))
                where.append((k, i))
    scored = await upstreams.score(items, request_id) if items else reward_pb2.ScoreResponse()
    scores, versions = [s.score for s in scored.scores], list(scored.model_versions)
    if len(scores) != len(items):
        raise APIError(502, f"the reward service returned {len(scores)} scores for "
                            f"{len(items)} items", "upstream_error")
    table: list[list[float | None]] = [[None] * len(r.completions) for r in response.results]
    for (k, i), score in zip(where, scores, strict=True):
        table[k][i] = score
    if canary and upstreams.canary is not None:
        upstreams.canary.rewarded(request_id, table)
    return [Ranked(r, mine, rank(mine), versions)
            for r, mine in zip(response.results, table, strict=True)]
