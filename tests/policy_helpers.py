"""Helpers for policy tests: random peft adapters for the tiny model, HF references, a client."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

ADMIN = "test-admin-token"
AUTH = (("authorization", f"Bearer {ADMIN}"),)


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 8,
                 targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> Path:
    """A peft LoRA adapter with random A and B (B non-zero), so it really changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0,
                     init_lora_weights=False)
    model = get_peft_model(base, cfg)
    model.save_pretrained(out)
    return out


@functools.lru_cache(maxsize=16)
def _hf_model(model_dir: str, adapter_dir: str | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return model


def hf_greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], n: int) -> list[int]:
    model = _hf_model(str(model_dir), str(adapter_dir) if adapter_dir else None)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


def hf_logprobs(model_dir: Path, adapter_dir: Path | None, prompt_ids, completion_ids):
    model = _hf_model(str(model_dir), str(adapter_dir) if adapter_dir else None)
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1: -1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def text_prompt(text: str) -> common_pb2.Prompt:
    return common_pb2.Prompt(text=text)


def ids_prompt(ids) -> common_pb2.Prompt:
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(ids)))


def greedy(n_tokens: int, **kw) -> policy_pb2.SamplingParams:
    return policy_pb2.SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True, **kw)


def base() -> policy_pb2.AdapterSelector:
    return policy_pb2.AdapterSelector(target=policy_pb2.ADAPTER_TARGET_BASE)


def pinned(name: str, version: int) -> policy_pb2.AdapterSelector:
    return policy_pb2.AdapterSelector(
        target=policy_pb2.ADAPTER_TARGET_PINNED,
        pinned=policy_pb2.AdapterRef(name=name, version=version),
    )


def stub(channel) -> policy_pb2_grpc.PolicyServiceStub:
    return policy_pb2_grpc.PolicyServiceStub(channel)


def version_of(served: policy_pb2.ServedBy):
    return None if served.base else (served.adapter.name, served.adapter.version)
