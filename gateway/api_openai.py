"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`n` samples are returned as generated; `best_of` samples that many and returns the `n` with the
highest reward (as OpenAI's completions API once did with its own log-probability ranking), with
each choice's `score`. `stream: true` (n = 1) sends server-sent events ending in `data: [DONE]`."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from gateway.errors import APIError, error_body
from gateway.feedback import StoredCandidate
from gateway.generation import (
    Ranked,
    chat_prompt,
    check_n,
    finish_reason,
    prompt_as_text,
    sample,
    sampling,
    score_all,
    stop_list,
    used_tokens,
    work,
)
from gateway.model_names import answered_by, model_id, selector_for, served_id
from gateway.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIBase,
    Usage,
)
from gateway.state import Caller, GatewayState, RequestId, State
from rlhf.formats import text_prompt
from rlhf.v1 import common_pb2, policy_pb2

router = APIRouter()

_SSE = {200: {"content": {"application/json": {}, "text/event-stream": {}},
              "description": "The completion, or a stream of server-sent events with stream=true"}}


def _unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param} is not supported by this gateway ({why})", "unsupported", param)


def _check_common(body: OpenAIBase, cfg) -> int:
    """Validates what the fields can't express alone; returns how many samples to draw."""
    if body.logit_bias:
        raise _unsupported("logit_bias", "the policy service has no logit bias")
    check_n(body.n, cfg.max_n)
    draws = body.n
    if body.best_of is not None:
        if body.best_of < body.n:
            raise APIError(400, f"best_of ({body.best_of}) must be at least n ({body.n})",
                           "invalid_request", "best_of")
        check_n(body.best_of, cfg.max_n, "best_of")
        draws = body.best_of
    if body.stream and draws != 1:
        raise APIError(400, "stream=true needs n=1 (and no best_of above 1)",
                       "invalid_request", "stream")
    return draws


def _params(body: OpenAIBase, draws: int, max_tokens: int | None, cfg) -> policy_pb2.SamplingParams:
    return sampling(draws, max_tokens or cfg.default_max_tokens, body.temperature, body.top_p,
                    body.seed, stop_list(body.stop), body.presence_penalty, body.frequency_penalty)


def _completion_prompts(prompt) -> list[common_pb2.Prompt]:
    if isinstance(prompt, str):
        prompts = [text_prompt(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt))]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [text_prompt(p) for p in prompt]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=p)) for p in prompt]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, or token ids",
                       "invalid_request", "prompt")
    for p in prompts:
        kind = p.WhichOneof("kind")
        if (kind == "text" and not p.text) or (kind == "token_ids" and not p.token_ids.ids):
            raise APIError(400, "prompt must not be empty", "invalid_request", "prompt")
        if kind == "token_ids" and any(i < 0 or i >= 2**32 for i in p.token_ids.ids):
            raise APIError(400, "token ids must be non-negative integers", "invalid_request",
                           "prompt")
    return prompts


def _chat_text(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise _unsupported("messages.content", f"content parts of type {part.type!r}")
        parts.append(part.text)
    return "".join(parts)


async def _draw(state: GatewayState, body: OpenAIBase, prompts: Sequence[common_pb2.Prompt],
                draws: int, max_tokens: int | None, caller: str, request_id: str, endpoint: str,
                reply: Response,
                ) -> tuple[policy_pb2.GenerateResponse, list[list[tuple[int, float | None]]]]:
    """Charges the caller's budgets, samples, ranks when best_of asks for it, and returns per
    prompt the (completion index, score) pairs to return, in order."""
    cfg = state.config
    selector = selector_for(body.model, cfg.adapter_name)
    params = _params(body, draws, max_tokens, cfg)
    charge = state.guard.charge(caller, *work(prompts, draws, params.max_tokens))
    response = await sample(state.upstreams, prompts, params, selector, request_id,
                            ranked=body.best_of is not None)
    charge.settle(used_tokens(response.usage))
    if body.best_of is None:
        return response, [[(i, None) for i in range(len(r.completions))]
                          for r in response.results]
    state.metrics.best_of_n.observe(draws)
    ranked = await score_all(state.upstreams, prompts, response, request_id)
    if len(prompts) == 1:
        await _store(state, reply, caller, request_id, endpoint, prompts[0], ranked[0])
    return response, [[(i, r.scores[i]) for i in r.order[:body.n]] for r in ranked]


async def _store(state: GatewayState, reply: Response, caller: str, request_id: str,
                 endpoint: str, prompt: common_pb2.Prompt, ranked: Ranked) -> None:
    cands = [StoredCandidate(i, c.text, ranked.scores[i], finish_reason(c.finish_reason))
             for i, c in enumerate(ranked.result.completions)]
    messages = ([{"role": m.role, "content": m.content} for m in prompt.chat.messages]
                if prompt.WhichOneof("kind") == "chat" else None)
    await state.keep_answer(reply, caller, request_id, endpoint,
                            served_id(answered_by(ranked.result), state.config.adapter_name),
                            prompt_as_text(prompt), messages, cands, ranked.order[0])


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _stream(state: GatewayState, body: OpenAIBase, prompt: common_pb2.Prompt,
                  max_tokens: int | None, caller: str, request_id: str,
                  chat: bool) -> StreamingResponse:
    cfg = state.config
    request = policy_pb2.GenerateStreamRequest(
        prompt=prompt, params=_params(body, 1, max_tokens, cfg),
        adapter=selector_for(body.model, cfg.adapter_name))
    charge = state.guard.charge(caller, *work([prompt], 1, request.params.max_tokens))
    # Awaited before the response starts: an upstream failure is still a proper HTTP error.
    messages = await state.upstreams.generate_stream(request, request_id)
    ident = ("chatcmpl-" if chat else "cmpl-") + request_id
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(model: str, text: str | None, finish: str | None, first: bool) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": ident, "object": obj, "created": created, "model": model,
                "choices": [choice]}

    async def events() -> AsyncIterator[bytes]:
        model, first = body.model, True
        try:
            async for msg in messages:
                if msg.HasField("usage"):
                    charge.settle(used_tokens(msg.usage))
                if msg.HasField("served_by"):
                    model = served_id(msg.served_by, cfg.adapter_name)
                finish = (finish_reason(msg.finish_reason)
                          if msg.finish_reason != policy_pb2.FINISH_REASON_UNSPECIFIED else None)
                if msg.text_delta or finish or first:
                    yield _sse(chunk(model, msg.text_delta, finish, first))
                    first = False
        except APIError as exc:
            yield _sse(error_body(exc.status, exc.message, exc.code))
        except Exception:  # noqa: BLE001 - the stream has started; end it with an error event
            yield _sse(error_body(502, "the policy stream failed", "upstream_error"))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.post("/v1/completions", response_model=CompletionResponse,
             response_model_exclude_none=True, responses=_SSE, summary="OpenAI text completions")
async def completions(body: CompletionRequest, state: State, caller: Caller,
                      request_id: RequestId, reply: Response):
    if body.logprobs is not None:
        raise _unsupported("logprobs", "use the policy service's Generate for log-probabilities")
    if body.echo:
        raise _unsupported("echo", "the prompt is not echoed")
    if body.suffix:
        raise _unsupported("suffix", "no fill-in-the-middle")
    draws = _check_common(body, state.config)
    prompts = _completion_prompts(body.prompt)
    if len(prompts) > state.config.max_prompts:
        raise APIError(400, f"{len(prompts)} prompts; at most {state.config.max_prompts} per call",
                       "invalid_request", "prompt")
    if body.stream:
        if len(prompts) != 1:
            raise APIError(400, "stream=true takes one prompt", "invalid_request", "prompt")
        return await _stream(state, body, prompts[0], body.max_tokens, caller, request_id,
                             chat=False)
    response, picks = await _draw(state, body, prompts, draws, body.max_tokens, caller,
                                  request_id, "completions", reply)
    choices = []
    for result, chosen in zip(response.results, picks, strict=True):
        for i, score in chosen:
            c = result.completions[i]
            choices.append(CompletionChoice(index=len(choices), text=c.text, score=score,
                                            finish_reason=finish_reason(c.finish_reason)))
    return CompletionResponse(id="cmpl-" + request_id, created=int(time.time()),
                              model=served_id(answered_by(response.results[0]),
                                              state.config.adapter_name),
                              choices=choices, usage=Usage.of(response.usage))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             response_model_exclude_none=True, responses=_SSE, summary="OpenAI chat completions")
async def chat_completions(body: ChatCompletionRequest, state: State, caller: Caller,
                           request_id: RequestId, reply: Response):
    if body.logprobs:
        raise _unsupported("logprobs", "use the policy service's Generate for log-probabilities")
    if body.tools:
        raise _unsupported("tools", "no tool calling")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise _unsupported("response_format", "only text responses")
    draws = _check_common(body, state.config)
    prompt = chat_prompt([(m.role, _chat_text(m.content)) for m in body.messages])
    max_tokens = body.max_completion_tokens or body.max_tokens
    if body.stream:
        return await _stream(state, body, prompt, max_tokens, caller, request_id, chat=True)
    response, picks = await _draw(state, body, [prompt], draws, max_tokens, caller, request_id,
                                  "chat", reply)
    result = response.results[0]
    choices = [ChatChoice(index=k, message=AssistantMessage(content=result.completions[i].text),
                          score=score,
                          finish_reason=finish_reason(result.completions[i].finish_reason))
               for k, (i, score) in enumerate(picks[0])]
    return ChatCompletionResponse(id="chatcmpl-" + request_id, created=int(time.time()),
                                  model=served_id(answered_by(result), state.config.adapter_name),
                                  choices=choices, usage=Usage.of(response.usage))


@router.get("/v1/models", response_model=ModelList, summary="Base model and adapter versions")
async def models(state: State, caller: Caller, request_id: RequestId) -> ModelList:
    listed = await state.upstreams.list_adapters(request_id)
    now, owner = int(time.time()), state.config.served_model_name
    cards = [ModelCard(id="base", created=now, owned_by=owner),
             ModelCard(id="policy", created=now, owned_by=owner)]
    for a in sorted(listed.adapters, key=lambda a: (a.adapter.name, a.adapter.version)):
        cards.append(ModelCard(id=model_id(a.adapter.name, a.adapter.version,
                                           state.config.adapter_name),
                               created=a.loaded_at.seconds or now, owned_by=owner))
    return ModelList(data=cards)
