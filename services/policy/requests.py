"""Turns GenerateRequest pieces into validated engine inputs; every refusal is INVALID_ARGUMENT
with a message that says which field and why. Pure functions over a tokenizer and limits."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf.formats import ROLES
from rlhf.plumbing.errors import InvalidArgument
from rlhf.v1 import common_pb2, policy_pb2
from services.policy.engine import Sampling

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_n: int
    max_prompts: int
    default_max_tokens: int


def sampling_from_proto(p: policy_pb2.SamplingParams, limits: Limits) -> Sampling:
    """Everything but max_tokens, which depends on each prompt's length (see max_tokens_for)."""
    n = p.n if p.HasField("n") else 1
    if n < 1:
        raise InvalidArgument("params.n must be >= 1")
    if n > limits.max_n:
        raise InvalidArgument(f"params.n is {n}; this server allows at most {limits.max_n}")
    temperature = p.temperature if p.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument("params.temperature must be >= 0")
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not (0 < top_p <= 1):
        raise InvalidArgument("params.top_p must be in (0, 1]")
    if p.top_k < -1:
        raise InvalidArgument("params.top_k must be -1, 0 (off) or a positive count")
    if not (0 <= p.min_p <= 1):
        raise InvalidArgument("params.min_p must be in [0, 1]")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(
            f"params.stop holds {len(p.stop)} strings; at most {MAX_STOP_STRINGS}"
        )
    for i, s in enumerate(p.stop):
        if not s:
            raise InvalidArgument(f"params.stop[{i}] is empty")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(f"params.stop[{i}] is longer than {MAX_STOP_CHARS} characters")
    for t in p.stop_token_ids:
        if t >= limits.vocab_size:
            raise InvalidArgument(f"params.stop_token_ids: {t} is not a token id "
                                  f"(vocabulary size {limits.vocab_size})")
    if p.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"params.top_logprobs must be <= {MAX_TOP_LOGPROBS}")
    rep = p.repetition_penalty if p.HasField("repetition_penalty") else 1.0
    if not (0 < rep <= 2):
        raise InvalidArgument("params.repetition_penalty must be in (0, 2]")
    for name in ("presence_penalty", "frequency_penalty"):
        if not (-2 <= getattr(p, name) <= 2):
            raise InvalidArgument(f"params.{name} must be in [-2, 2]")
    if p.HasField("max_tokens") and p.max_tokens < 1:
        raise InvalidArgument("params.max_tokens must be >= 1")
    if p.min_tokens and p.HasField("max_tokens") and p.min_tokens > p.max_tokens:
        raise InvalidArgument("params.min_tokens must be <= params.max_tokens")
    return Sampling(
        n=n,
        max_tokens=p.max_tokens if p.HasField("max_tokens") else 0,
        temperature=temperature,
        top_p=top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        seed=p.seed if p.HasField("seed") else None,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
        min_tokens=p.min_tokens,
        repetition_penalty=rep,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        ignore_eos=p.ignore_eos,
    )


def max_tokens_for(sampling: Sampling, prompt_len: int, limits: Limits, where: str) -> int:
    room = limits.max_model_len - prompt_len
    if room < 1:
        raise InvalidArgument(
            f"{where} has {prompt_len} tokens; the context is {limits.max_model_len}, "
            "leaving no room to generate"
        )
    if sampling.max_tokens == 0:  # not given: the default, capped to what fits
        return min(limits.default_max_tokens, room)
    if sampling.max_tokens > room:
        raise InvalidArgument(
            f"params.max_tokens is {sampling.max_tokens} but {where} has {prompt_len} tokens "
            f"and the context is {limits.max_model_len} (at most {room} more)"
        )
    return sampling.max_tokens


def prompt_token_ids(prompt: common_pb2.Prompt, tokenizer, limits: Limits, where: str) -> list[int]:
    kind = prompt.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{where} is empty: set text, token_ids or chat")
    if kind == "text":
        if not prompt.text:
            raise InvalidArgument(f"{where}.text is empty")
        ids = tokenizer(prompt.text, add_special_tokens=True)["input_ids"]
    elif kind == "token_ids":
        ids = list(prompt.token_ids.ids)
        if not ids:
            raise InvalidArgument(f"{where}.token_ids is empty")
        bad = next((t for t in ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                f"{where}.token_ids holds {bad}, outside the vocabulary (size {limits.vocab_size})"
            )
    else:
        ids = chat_token_ids(prompt.chat, tokenizer, where)
    if not ids:
        raise InvalidArgument(f"{where} tokenizes to nothing")
    if len(ids) >= limits.max_model_len:
        raise InvalidArgument(
            f"{where} has {len(ids)} tokens; the context is {limits.max_model_len} tokens"
        )
    return ids


def chat_token_ids(chat: common_pb2.ChatConversation, tokenizer, where: str) -> list[int]:
    if not chat.messages:
        raise InvalidArgument(f"{where}.chat has no messages")
    messages = []
    for i, msg in enumerate(chat.messages):
        if msg.role not in ROLES:
            raise InvalidArgument(
                f"{where}.chat.messages[{i}].role is {msg.role!r}; use one of {sorted(ROLES)}"
            )
        if not msg.content and msg.role != "assistant":
            raise InvalidArgument(f"{where}.chat.messages[{i}].content is empty")
        messages.append({"role": msg.role, "content": msg.content})
    if chat.continue_final_message and messages[-1]["role"] != "assistant":
        raise InvalidArgument(
            f"{where}.chat.continue_final_message needs an assistant message last"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidArgument("the served model has no chat template; send text or token_ids")
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not chat.continue_final_message,
            continue_final_message=chat.continue_final_message,
        )
    except Exception as exc:  # noqa: BLE001 - template errors are the caller's input
        raise InvalidArgument(
            f"{where}.chat cannot be rendered by the chat template: {exc}"
        ) from exc
    return tokenizer(text, add_special_tokens=False)["input_ids"]
