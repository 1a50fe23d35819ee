"""Tables of bad input shared by the policy tests on vLLM and on the FakeEngine: bad Generate
requests and bad pushes, each with the status and the words the refusal must carry."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from rlhf.clients.push import push_requests
from rlhf.v1 import common_pb2, policy_pb2
from tests.fixtures.policy_helpers import ids_prompt, stub, text_prompt


def chat(*turns, cont=False) -> common_pb2.Prompt:
    msgs = [common_pb2.ChatMessage(role=r, content=c) for r, c in turns]
    return common_pb2.Prompt(chat=common_pb2.ChatConversation(messages=msgs,
                                                              continue_final_message=cont))


def bad_requests(max_len: int):
    P = policy_pb2.SamplingParams
    ok = [text_prompt("hi")]
    long_ids = ids_prompt([5] * max_len)
    return {
        "no prompts": (policy_pb2.GenerateRequest(params=P(max_tokens=2)), "prompts is empty"),
        "empty prompt": (policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt()]),
                         "prompts[0] is empty"),
        "empty text": (policy_pb2.GenerateRequest(prompts=[text_prompt("hi"), text_prompt("")]),
                       "prompts[1].text is empty"),
        "n zero": (policy_pb2.GenerateRequest(prompts=ok, params=P(n=0)), "n must be >= 1"),
        "n too big": (policy_pb2.GenerateRequest(prompts=ok, params=P(n=17)), "at most 16"),
        "max_tokens zero": (policy_pb2.GenerateRequest(prompts=ok, params=P(max_tokens=0)),
                            "max_tokens must be >= 1"),
        "max_tokens beyond context": (
            policy_pb2.GenerateRequest(prompts=ok, params=P(max_tokens=max_len)),
            "context is 512"),
        "prompt too long": (policy_pb2.GenerateRequest(prompts=[long_ids]), "512 tokens"),
        "token id out of range": (policy_pb2.GenerateRequest(prompts=[ids_prompt([1, 99999])]),
                                  "outside the vocabulary"),
        "bad role": (policy_pb2.GenerateRequest(prompts=[chat(("wizard", "hi"))]),
                     "role is 'wizard'"),
        "empty chat": (policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(
            chat=common_pb2.ChatConversation())]), "has no messages"),
        "empty user turn": (policy_pb2.GenerateRequest(prompts=[chat(("user", ""))]),
                            "content is empty"),
        "continue without assistant": (
            policy_pb2.GenerateRequest(prompts=[chat(("user", "hi"), cont=True)]),
            "assistant message last"),
        "empty stop": (policy_pb2.GenerateRequest(prompts=ok, params=P(stop=[""])),
                       "stop[0] is empty"),
        "too many stops": (policy_pb2.GenerateRequest(prompts=ok, params=P(stop=["a"] * 17)),
                           "at most 16"),
        "long stop": (policy_pb2.GenerateRequest(prompts=ok, params=P(stop=["a" * 300])),
                      "longer than 256"),
        "negative temperature": (policy_pb2.GenerateRequest(prompts=ok,
                                                            params=P(temperature=-1)),
                                 "temperature"),
        "top_p zero": (policy_pb2.GenerateRequest(prompts=ok, params=P(top_p=0)), "top_p"),
        "too many top logprobs": (policy_pb2.GenerateRequest(prompts=ok,
                                                             params=P(top_logprobs=21)),
                                  "top_logprobs"),
        "unknown adapter": (policy_pb2.GenerateRequest(
            prompts=ok, adapter=policy_pb2.AdapterSelector(
                target=policy_pb2.ADAPTER_TARGET_PINNED,
                pinned=policy_pb2.AdapterRef(name="nobody", version=1))),
            "no adapter named 'nobody'"),
        "bad adapter name": (policy_pb2.GenerateRequest(
            prompts=ok, adapter=policy_pb2.AdapterSelector(
                target=policy_pb2.ADAPTER_TARGET_PINNED,
                pinned=policy_pb2.AdapterRef(name="../etc", version=1))),
            "adapter name '../etc' is invalid"),
    }


def _header_and_data(folder: Path, **overrides):
    msgs = list(push_requests(folder, overrides.pop("name", "bad"), 1, "tiny", chunk_bytes=4096))
    header = msgs[0].header
    for key, value in overrides.items():
        setattr(header, key, value)
    return msgs


def _bad_tensors(tmp: Path, folder: Path) -> Path:
    out = tmp / "shapes"
    out.mkdir()
    (out / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 100),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(256, 8),
    }, str(out / "adapter_model.safetensors"))
    return out


def _with_config(tmp: Path, folder: Path, **changes) -> Path:
    out = tmp / ("cfg-" + "-".join(changes))
    out.mkdir()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    (out / "adapter_model.safetensors").write_bytes(
        (folder / "adapter_model.safetensors").read_bytes())
    return out


def bad_pushes(folder: Path, tmp: Path):
    good = _header_and_data(folder)
    data = b"".join(m.data for m in good[1:])
    truncated = good[:-1]
    return {
        "hash mismatch": (_header_and_data(folder, sha256="0" * 64),
                          grpc.StatusCode.INVALID_ARGUMENT, "sha256 mismatch"),
        "truncated stream": (truncated, grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        "more bytes than announced": (
            good + [policy_pb2.PushAdapterRequest(data=b"x")],
            grpc.StatusCode.INVALID_ARGUMENT, "more than the"),
        "wrong base": (_header_and_data(folder, base_model_id="llama-70b"),
                       grpc.StatusCode.FAILED_PRECONDITION, "trained on base model 'llama-70b'"),
        "same base name, other model": (
            _header_and_data(folder, base_model_fingerprint="0123456789abcdef"),
            grpc.StatusCode.FAILED_PRECONDITION, "config and tokenizer differ"),
        "too large": (_header_and_data(folder, size_bytes=10**12),
                      grpc.StatusCode.INVALID_ARGUMENT, "at most"),
        "wrong shapes": (_header_and_data(_bad_tensors(tmp, folder)),
                         grpc.StatusCode.INVALID_ARGUMENT, "takes 256 inputs"),
        "rank too big": (_header_and_data(_with_config(tmp, folder, r=32)),
                         grpc.StatusCode.INVALID_ARGUMENT, "exceeds this replica's max_lora_rank"),
        "unknown module": (
            _header_and_data(_with_config(tmp, folder, target_modules=["q_proj", "wizard"])),
            grpc.StatusCode.INVALID_ARGUMENT, "['wizard'] do not exist"),
        "not safetensors": (
            [policy_pb2.PushAdapterRequest(header=policy_pb2.AdapterHeader(
                adapter=policy_pb2.AdapterRef(name="bad", version=1),
                sha256=hashlib.sha256(b"junk" * 100).hexdigest(), size_bytes=400,
                base_model_id="tiny", peft_config_json=good[0].header.peft_config_json)),
             policy_pb2.PushAdapterRequest(data=b"junk" * 100)],
            grpc.StatusCode.INVALID_ARGUMENT, "not a valid safetensors"),
        "path traversal name": (_header_and_data(folder, name="../../escape"),
                                grpc.StatusCode.INVALID_ARGUMENT, "is invalid"),
        "dot name": (_header_and_data(folder, name=".hidden"),
                     grpc.StatusCode.INVALID_ARGUMENT, "is invalid"),
        "empty stream": ([], grpc.StatusCode.INVALID_ARGUMENT, "send the header first"),
        "data first": ([policy_pb2.PushAdapterRequest(data=data[:10])],
                       grpc.StatusCode.INVALID_ARGUMENT, "must be the header"),
        "two headers": ([good[0], good[0]], grpc.StatusCode.INVALID_ARGUMENT,
                        "only the first message"),
        "bad peft json": (_header_and_data(folder, peft_config_json="{nope"),
                          grpc.StatusCode.INVALID_ARGUMENT, "not JSON"),
        "bad sha format": (_header_and_data(folder, sha256="xyz"),
                           grpc.StatusCode.INVALID_ARGUMENT, "64 lower-case hex"),
    }


BAD_PUSHES = [
    "hash mismatch", "truncated stream", "more bytes than announced", "wrong base",
    "same base name, other model", "too large",
    "wrong shapes", "rank too big", "unknown module", "not safetensors", "path traversal name",
    "dot name", "empty stream", "data first", "two headers", "bad peft json", "bad sha format",
]




async def read_stream(channel, req: policy_pb2.GenerateStreamRequest, started: asyncio.Event,
                      timeout: float):
    """A GenerateStream call read to its end: (tokens, served_by, finished_by), the versions as
    (name, version); `started` is set once the first token has arrived."""
    tokens, served, finished = [], None, None
    async for msg in stub(channel).GenerateStream(req, timeout=timeout):
        if msg.HasField("served_by"):
            served = (msg.served_by.adapter.name, msg.served_by.adapter.version)
        if msg.HasField("finished_by"):
            finished = (msg.finished_by.adapter.name, msg.finished_by.adapter.version)
        tokens += msg.token_ids
        if tokens:
            started.set()
    return tokens, served, finished


async def assert_bad_request_refused(channel, case: str) -> None:
    """Generate with bad_requests()[case] is refused: NOT_FOUND for a missing adapter, else
    INVALID_ARGUMENT, with the message that names the field."""
    request, message = bad_requests(512)[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(channel).Generate(request, timeout=30)
    expected = grpc.StatusCode.NOT_FOUND if "no adapter" in message else (
        grpc.StatusCode.INVALID_ARGUMENT)
    assert err.value.code() == expected, err.value.details()
    assert message in err.value.details()
