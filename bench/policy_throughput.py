"""Policy throughput: one workload (default 32 prompts x n=4 x 64 tokens on SmolLM2) through the
gRPC service, through the same in-process AsyncLLM directly, and through HF `generate`.
Targets: gRPC >= 0.9x in-process, vLLM >= 2x HF.

    python bench/policy_throughput.py [--prompts 32 --n 4 --tokens 64 --dtype bfloat16]
        [--mode merged|lora]

The workload is the base model, so the default server runs in merged adapter mode, whose engine
has no LoRA layers (the CPU fast path; see docs). In lora mode vLLM wraps every adapted layer for
LoRA, which on CPU slows even base requests by about a quarter (bench/adapter_speed.py prints
both modes' base speed).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import _common as C


async def via_grpc(channel, prompts, n, tokens) -> tuple[int, float]:
    from rlhf.v1 import policy_pb2, policy_pb2_grpc

    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    req = policy_pb2.GenerateRequest(
        prompts=prompts,
        params=policy_pb2.SamplingParams(n=n, max_tokens=tokens, temperature=1.0, seed=0,
                                         ignore_eos=True, logprobs=True),
    )
    start = time.perf_counter()
    resp = await stub.Generate(req, timeout=3600)
    return resp.usage.completion_tokens, time.perf_counter() - start


async def via_asyncllm(llm, prompt_ids, n, tokens) -> tuple[int, float]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(n=n, max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True,
                            logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY)

    async def one(i, ids):
        final = None
        request_id = f"bench-{time.time()}-{i}"
        async for out in llm.generate({"prompt_token_ids": ids}, params, request_id):
            final = out
        return sum(len(c.token_ids) for c in final.outputs)

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids)))
    return sum(counts), time.perf_counter() - start


def via_hf(prompt_ids, n, tokens, dtype) -> tuple[int, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
                   "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(C.default_model(), dtype=torch_dtype).eval()
    width = max(len(p) for p in prompt_ids)
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             max_new_tokens=tokens, min_new_tokens=tokens,
                             num_return_sequences=n, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - width) * out.shape[0], elapsed


async def main(args) -> None:
    from transformers import AutoTokenizer

    prompts = C.chat_prompts(args.prompts)
    tok = AutoTokenizer.from_pretrained(C.default_model())
    prompt_ids = [
        tok(tok.apply_chat_template([{"role": "user", "content": p.chat.messages[0].content}],
                                    tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    server, channel = await C.start_policy(args.mode, args.dtype)
    try:
        llm = server.app.engine.llm
        await via_grpc(channel, prompts[:4], 1, 8)  # warm-up
        rounds = {"grpc": [], "inproc": []}
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            t, s = await via_grpc(channel, prompts, args.n, args.tokens)
            rounds["grpc"].append(t / s)
            t, s = await via_asyncllm(llm, prompt_ids, args.n, args.tokens)
            rounds["inproc"].append(t / s)
    finally:
        await channel.close()
        await server.shutdown()
    hf_tokens, hf_seconds = via_hf(prompt_ids, args.n, args.tokens, args.dtype)
    grpc_tps, inproc_tps = max(rounds["grpc"]), max(rounds["inproc"])
    hf_tps = hf_tokens / hf_seconds
    print(f"workload: {args.prompts} prompts x n={args.n} x {args.tokens} tokens, {args.dtype}, "
          f"{args.mode} mode")
    print(f"gRPC service     {grpc_tps:8.1f} tokens/s")
    print(f"in-process vLLM  {inproc_tps:8.1f} tokens/s")
    print(f"HF generate      {hf_tps:8.1f} tokens/s")
    print(f"gRPC / in-process = {grpc_tps / inproc_tps:.3f} (target >= 0.9)")
    print(f"vLLM (gRPC) / HF  = {grpc_tps / hf_tps:.3f} (target >= 2)")
    C.report("policy_throughput", {
        "prompts": args.prompts, "n": args.n, "tokens": args.tokens, "dtype": args.dtype,
        "mode": args.mode, "grpc_tokens_per_s": round(grpc_tps, 1),
        "inproc_tokens_per_s": round(inproc_tps, 1),
        "hf_tokens_per_s": round(hf_tps, 1),
        "grpc_over_inproc": round(grpc_tps / inproc_tps, 3),
        "vllm_over_hf": round(grpc_tps / hf_tps, 3),
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mode", default="merged", choices=["merged", "lora"])
    asyncio.run(main(parser.parse_args()))
