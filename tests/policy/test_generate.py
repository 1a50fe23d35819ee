"""PolicyService generation on real vLLM (tiny model, fp32, eager): shapes, seeds, logprobs
against HF, chat templates, streaming, aborts, admission, bad input, metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
import torch
from transformers import AutoTokenizer

from rlhf.v1 import policy_pb2
from tests.fixtures.policy_helpers import (
    base,
    greedy,
    hf_greedy,
    hf_logprobs,
    ids_prompt,
    stub,
    text_prompt,
)
from tests.policy.helpers import assert_bad_request_refused, bad_requests, chat

pytestmark = pytest.mark.vllm


@pytest.fixture
def policy(policy_lora):
    return policy_lora


async def test_batch_with_n_gives_counts_shapes_and_usage(policy):
    req = policy_pb2.GenerateRequest(
        prompts=[text_prompt("the cat"), ids_prompt([5, 6, 7, 8]), chat(("user", "hi there"))],
        params=policy_pb2.SamplingParams(n=3, max_tokens=6, logprobs=True, top_logprobs=2,
                                         ignore_eos=True, seed=3),
        adapter=base(),
    )
    resp = await stub(policy.channel).Generate(req, timeout=60)
    assert len(resp.results) == 3
    total = 0
    for i, result in enumerate(resp.results):
        assert result.prompt_index == i
        assert result.served_by.base
        assert [c.index for c in result.completions] == [0, 1, 2]
        for c in result.completions:
            assert len(c.token_ids) == 6 == len(c.logprobs) == len(c.top_logprobs)
            assert c.finish_reason == policy_pb2.FINISH_REASON_LENGTH
            assert all(lp <= 0 for lp in c.logprobs)
            for top in c.top_logprobs:
                assert len(top.token_ids) == 2 and top.logprobs[0] >= top.logprobs[1]
            total += len(c.token_ids)
    assert list(resp.results[1].prompt_token_ids) == [5, 6, 7, 8]
    assert resp.usage.completion_tokens == total == 54
    assert resp.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in resp.results)
    assert len(resp.request_id) > 0


async def test_seed_makes_sampling_reproducible(policy):
    def req(seed):
        return policy_pb2.GenerateRequest(
            prompts=[text_prompt("once upon a time")],
            params=policy_pb2.SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=seed,
                                             ignore_eos=True),
            adapter=base(),
        )

    s = stub(policy.channel)
    a, b, c = await asyncio.gather(s.Generate(req(7)), s.Generate(req(7)), s.Generate(req(8)))

    def toks(r):
        return [list(x.token_ids) for x in r.results[0].completions]

    assert toks(a) == toks(b)
    assert toks(a) != toks(c)
    assert len({tuple(t) for t in toks(a)}) > 1  # the n samples differ from each other


async def test_logprobs_match_hf_teacher_forcing(policy):
    """Raw logprobs (before temperature) of sampled tokens equal HF's log-softmax within 1e-4."""
    resp = await stub(policy.channel).Generate(policy_pb2.GenerateRequest(
        prompts=[text_prompt("a red apple and"), ids_prompt([40, 41, 42])],
        params=policy_pb2.SamplingParams(n=2, max_tokens=10, temperature=1.7, top_k=50,
                                         seed=11, logprobs=True, ignore_eos=True),
        adapter=base(),
    ), timeout=60)
    for result in resp.results:
        for c in result.completions:
            want = hf_logprobs(policy.model_dir, None, list(result.prompt_token_ids),
                               list(c.token_ids))
            assert torch.allclose(torch.tensor(list(c.logprobs)), want, atol=1e-4)


async def test_greedy_equals_hf_and_chat_uses_the_template(policy):
    tok = AutoTokenizer.from_pretrained(policy.model_dir)
    resp = await stub(policy.channel).Generate(policy_pb2.GenerateRequest(
        prompts=[chat(("system", "be brief"), ("user", "what is a cat?"))],
        params=greedy(12), adapter=base(),
    ), timeout=60)
    result = resp.results[0]
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cat?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert list(result.prompt_token_ids) == tok(rendered, add_special_tokens=False)["input_ids"]
    got = list(result.completions[0].token_ids)
    assert got == hf_greedy(policy.model_dir, None, list(result.prompt_token_ids), 12)


async def test_stop_strings_and_finish_reason(policy):
    s = stub(policy.channel)
    first = await s.Generate(policy_pb2.GenerateRequest(
        prompts=[text_prompt("the dog")], params=greedy(20), adapter=base()), timeout=60)
    text = first.results[0].completions[0].text
    stop = text[3:6]
    assert stop.strip(), text
    resp = await s.Generate(policy_pb2.GenerateRequest(
        prompts=[text_prompt("the dog")],
        params=policy_pb2.SamplingParams(temperature=0.0, max_tokens=20, stop=[stop]),
        adapter=base()), timeout=60)
    c = resp.results[0].completions[0]
    assert c.finish_reason == policy_pb2.FINISH_REASON_STOP
    assert c.stop_string == stop
    assert c.text == text[: text.index(stop)]


async def test_stream_equals_unary(policy):
    s = stub(policy.channel)
    unary = await s.Generate(policy_pb2.GenerateRequest(
        prompts=[text_prompt("hello world")], params=greedy(10, logprobs=True), adapter=base()),
        timeout=60)
    chunks = [c async for c in s.GenerateStream(policy_pb2.GenerateStreamRequest(
        prompt=text_prompt("hello world"), params=greedy(10, logprobs=True), adapter=base()),
        timeout=60)]
    assert chunks[0].served_by.base and list(chunks[0].prompt_token_ids) == list(
        unary.results[0].prompt_token_ids)
    assert chunks[-1].usage.completion_tokens == 10
    body = chunks[1:-1]
    assert len(body) >= 2  # really streamed, not one final message
    token_ids = [t for c in body for t in c.token_ids]
    want = unary.results[0].completions[0]
    assert token_ids == list(want.token_ids)
    assert "".join(c.text_delta for c in body) == want.text
    logprobs = [lp for c in body for lp in c.logprobs]
    assert logprobs == pytest.approx(list(want.logprobs), abs=1e-5)
    assert body[-1].finish_reason == policy_pb2.FINISH_REASON_LENGTH


async def test_expired_deadline_aborts_the_engine_request(policy, monkeypatch):
    llm = policy.app.engine.llm
    aborted: list = []
    real_abort = llm.abort

    async def spy(request_id, *args, **kwargs):
        aborted.append(request_id)
        return await real_abort(request_id, *args, **kwargs)

    monkeypatch.setattr(llm, "abort", spy)
    long = policy_pb2.SamplingParams(n=8, max_tokens=480, ignore_eos=True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(policy.channel).Generate(policy_pb2.GenerateRequest(
            prompts=[text_prompt("go on")], params=long, adapter=base()), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if aborted and policy.app.engine.pending_requests() == 0:
            break
        await asyncio.sleep(0.1)
    assert aborted, "the vLLM request was not aborted"
    assert policy.app.engine.pending_requests() == 0

    # The same for a cancelled stream.
    aborted.clear()
    call = stub(policy.channel).GenerateStream(policy_pb2.GenerateStreamRequest(
        prompt=text_prompt("go on"), params=long, adapter=base()))
    async for chunk in call:
        if chunk.token_ids:  # the engine request is running (the first message precedes it)
            break
    call.cancel()
    for _ in range(100):
        if aborted and policy.app.engine.pending_requests() == 0:
            break
        await asyncio.sleep(0.1)
    assert aborted and policy.app.engine.pending_requests() == 0


async def test_admission_bound_refuses_with_the_limit(policy, monkeypatch):
    monkeypatch.setattr(policy.app.servicer.admission, "limit", 8)
    s = stub(policy.channel)
    slow = asyncio.ensure_future(s.Generate(policy_pb2.GenerateRequest(
        prompts=[text_prompt("x")], params=policy_pb2.SamplingParams(n=6, max_tokens=200,
                                                                      ignore_eos=True),
        adapter=base()), timeout=120))
    while policy.app.servicer.admission.pending == 0:
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Generate(policy_pb2.GenerateRequest(
            prompts=[text_prompt("y")], params=policy_pb2.SamplingParams(n=4, max_tokens=2),
            adapter=base()), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit 8" in err.value.details()
    resp = await slow  # the admitted call is unaffected
    assert len(resp.results[0].completions) == 6
    assert policy.app.servicer.admission.pending == 0


@pytest.mark.parametrize("case", list(bad_requests(512)))
async def test_bad_input_is_invalid_argument_or_not_found(policy, case):
    await assert_bad_request_refused(policy.channel, case)


async def test_bad_stream_input(policy):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub(policy.channel).GenerateStream(
            policy_pb2.GenerateStreamRequest(), timeout=30
        ):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_metrics_series(policy):
    await stub(policy.channel).Generate(policy_pb2.GenerateRequest(
        prompts=[text_prompt("count me")], params=greedy(4), adapter=base()), timeout=60)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub(policy.channel).Generate(policy_pb2.GenerateRequest(), timeout=30)
    url = f"http://127.0.0.1:{policy.server.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for series in (
        'rlhf_policy_grpc_requests_total{code="OK",method="Generate"}',
        'rlhf_policy_grpc_requests_total{code="INVALID_ARGUMENT",method="Generate"}',
        "rlhf_policy_grpc_request_duration_seconds_bucket",
        "rlhf_policy_prompt_tokens_total",
        "rlhf_policy_generated_tokens_total",
        "rlhf_policy_requests_running",
        "rlhf_policy_requests_waiting",
        "rlhf_policy_adapter_load_seconds_bucket",
        "rlhf_policy_adapter_pushed_bytes_total",
    ):
        assert series in body, series
    generated = next(float(line.split()[-1]) for line in body.splitlines()
                     if line.startswith("rlhf_policy_generated_tokens_total"))
    assert generated >= 4


async def test_seeded_batch_larger_than_one_prefill_chunk(policy):
    """vLLM 0.32 on CPU kills its engine when a seeded request's prefill is split over steps
    ("CPU Generator does not use offset"); the policy runs without chunked prefill so a big
    seeded batch (as the trainer sends) just works."""
    prompts = [ids_prompt([(i * 7 + j) % 300 + 3 for j in range(400)]) for i in range(24)]
    resp = await stub(policy.channel).Generate(policy_pb2.GenerateRequest(
        prompts=prompts, params=policy_pb2.SamplingParams(n=2, max_tokens=4, seed=5,
                                                          ignore_eos=True),
        adapter=base()), timeout=300)
    assert [len(c.token_ids) for r in resp.results for c in r.completions] == [4] * 48
    # ...and the engine is still alive for the next call.
    again = await stub(policy.channel).Generate(policy_pb2.GenerateRequest(
        prompts=[text_prompt("still here")], params=greedy(3), adapter=base()), timeout=60)
    assert len(again.results[0].completions[0].token_ids) == 3
