"""POST /v1/best-of-n: n samples from the policy, each scored by the reward service, the best
returned; every candidate and score is stored so feedback can refer to it."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.feedback import StoredCandidate
from gateway.generation import (
    chat_prompt,
    check_n,
    finish_reason,
    prompt_as_text,
    sample,
    sampling,
    score_all,
    used_tokens,
    work,
)
from gateway.model_names import answered_by, selector_for, served_id
from gateway.schemas import BestOfNRequest, BestOfNResponse, Candidate, Usage
from gateway.state import Caller, RequestId, State
from rlhf.formats import text_prompt

router = APIRouter()


@router.post("/v1/best-of-n", response_model=BestOfNResponse,
             summary="The best of n sampled answers, ranked by the reward model")
async def best_of_n(body: BestOfNRequest, state: State, caller: Caller,
                    request_id: RequestId, reply: Response) -> BestOfNResponse:
    cfg = state.config
    check_n(body.n, cfg.max_n)
    selector = selector_for(body.model, cfg.adapter_name)
    prompt = (text_prompt(body.prompt) if body.prompt is not None
              else chat_prompt([(m.role, m.content) for m in body.messages]))
    max_tokens = body.max_tokens or cfg.default_max_tokens
    params = sampling(body.n, max_tokens, body.temperature, body.top_p, body.seed, body.stop or ())
    charge = state.guard.charge(caller, *work([prompt], body.n, max_tokens))
    state.metrics.best_of_n.observe(body.n)
    response = await sample(state.upstreams, [prompt], params, selector, request_id,
                            ranked=True)
    charge.settle(used_tokens(response.usage))
    ranked = (await score_all(state.upstreams, [prompt], response, request_id))[0]
    completions = ranked.result.completions
    candidates = [
        Candidate(index=i, rank=ranked.order.index(i), text=c.text, score=ranked.scores[i],
                  finish_reason=finish_reason(c.finish_reason))
        for i, c in enumerate(completions)]
    best = candidates[ranked.order[0]]
    version = answered_by(ranked.result)
    model = served_id(version, cfg.adapter_name)
    await state.keep_answer(
        reply, caller, request_id, "best-of-n", model, prompt_as_text(prompt),
        None if body.messages is None else [m.model_dump() for m in body.messages],
        [StoredCandidate(c.index, c.text, c.score, c.finish_reason) for c in candidates],
        best.index)
    return BestOfNResponse(
        request_id=request_id, model=model,
        adapter_version=0 if model == "base" else version.adapter.version,
        reward_model_versions=ranked.reward_model_versions,
        best=best,
        candidates=sorted(candidates, key=lambda c: c.rank) if body.return_candidates else None,
        usage=Usage.of(response.usage))
