"""Helpers for policy tests: random peft adapters for the tiny model, HF references, a client."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import grpc
import torch

from rlhf.adapter_push import push_adapter
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


def hf_greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int],
              n: int) -> list[int]:
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


SWAP_PROMPT = [20, 21, 22, 23, 24]


async def generate_greedy(policy, n_tokens: int, selector=None, prompt=SWAP_PROMPT):
    tokens, served, _ = await generate_greedy_result(policy, n_tokens, selector, prompt)
    return tokens, served


async def generate_greedy_result(policy, n_tokens: int, selector=None, prompt=SWAP_PROMPT):
    """(tokens, served_by, finished_by); finished_by is False unless the weights changed
    during the call (else the version that finished it, None = base)."""
    req = policy_pb2.GenerateRequest(prompts=[ids_prompt(prompt)], params=greedy(n_tokens))
    if selector is not None:
        req.adapter.CopyFrom(selector)
    resp = await stub(policy.channel).Generate(req, timeout=60)
    result = resp.results[0]
    finished = version_of(result.finished_by) if result.HasField("finished_by") else False
    return list(result.completions[0].token_ids), version_of(result.served_by), finished


def switched_tokens_match(model_dir, before: Path | None, after: Path | None, prompt,
                          tokens: list[int]) -> bool:
    """A request the weights changed under: its first k tokens are the old weights' greedy
    tokens and the rest the new weights' greedy continuation of prompt + those k, for some k."""
    old = hf_greedy(model_dir, before, prompt, len(tokens))
    for k in range(len(tokens) + 1):
        if tokens[:k] != old[:k]:
            break
        if tokens[k:] == hf_greedy(model_dir, after, list(prompt) + tokens[:k], len(tokens) - k):
            return True
    return False


async def run_hot_swap(policy, adapters, name: str, versions: int = 12, clients: int = 4,
                       follows_switches: bool = False):
    """Clients keep sending while `versions` adapter versions are pushed and activated. Asserts:
    no call fails; every response names a version active at some point during the call (push
    of v began before the call ended, push of v+1 ended after it began); and the tokens are that
    version's (HF+peft reference), so the label matches the weights.
    follows_switches (merged mode): a call the weights changed under names both versions, and
    its tokens are the old version's up to some point and the new version's after it."""
    n_tokens = 6
    contents = {v: adapters[v % len(adapters)] for v in range(1, versions + 1)}
    refs = {None: hf_greedy(policy.model_dir, None, SWAP_PROMPT, n_tokens)}
    for i, folder in enumerate(adapters):
        refs[i] = hf_greedy(policy.model_dir, folder, SWAP_PROMPT, n_tokens)
    pushes: dict[int, tuple[float, float]] = {}
    calls: list = []
    failures: list = []
    done = asyncio.Event()

    async def client():
        while not done.is_set():
            start = time.monotonic()
            try:
                tokens, served, finished = await generate_greedy_result(policy, n_tokens)
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
                continue
            calls.append((start, time.monotonic(), served, finished, tokens))

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(0.3)
    for version in range(1, versions + 1):
        start = time.monotonic()
        await push_adapter(policy.channel, contents[version], name, version, "tiny", token=ADMIN)
        pushes[version] = (start, time.monotonic())
        # Let calls complete on this version before the next push, however slow the machine:
        # 2 x clients completions include some that started after the switch.
        target = len(calls) + 2 * clients
        deadline = time.monotonic() + 120
        while len(calls) < target and time.monotonic() < deadline and not failures:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    done.set()
    await asyncio.gather(*tasks)

    assert failures == [], failures[:3]
    assert len(calls) > 20
    seen = set()
    switched = 0
    for start, end, served, finished, tokens in calls:
        if finished is not False:
            assert follows_switches, "the weights changed under a call in lora mode"
            switched += 1
            before = 0 if served is None else served[1]
            after = finished[1]
            assert after > before, (served, finished)
            assert start <= pushes[before + 1][1] and pushes[after][0] <= end
            if after == before + 1:  # one switch: the tokens show where it happened
                assert switched_tokens_match(
                    policy.model_dir, None if served is None else contents[before],
                    contents[after], SWAP_PROMPT, tokens), (served, finished, tokens)
            continue
        if served is None:
            assert start <= pushes[1][1], "base served after v1 was active"
            assert tokens == refs[None]
            continue
        served_name, version = served
        assert served_name == name
        assert pushes[version][0] <= end, f"v{version} served before its push began"
        if version + 1 in pushes:
            assert pushes[version + 1][1] >= start, f"v{version} served after v{version + 1}"
        assert tokens == refs[version % len(adapters)], f"v{version} answered with other weights"
        seen.add(version)
    assert len(seen) >= versions // 2  # the load really overlapped the swaps
    return calls, switched


async def set_active(policy, name=None, version=0):
    """SetActiveAdapter with the admin token; name None = the base model."""
    req = policy_pb2.SetActiveAdapterRequest(
        base=name is None, adapter=policy_pb2.AdapterRef(name=name or "", version=version))
    return await stub(policy.channel).SetActiveAdapter(req, metadata=AUTH, timeout=60)
