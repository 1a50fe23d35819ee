"""Speed with an active r=16 adapter (q/k/v/o) in each adapter mode, divided by the base model's
speed on the same server, same workload (default 32 prompts x n=4 x 64 tokens, SmolLM2).
Target: merged >= 0.9 (vLLM's CPU LoRA path was measured at about a quarter of base speed).
Mode `lora-vllm-ops` is lora mode with vLLM's own CPU LoRA ops instead of the grouped ones
(services/policy/vllm_backend/cpu_lora.py), for the side-by-side ratio.

    python bench/adapter_speed.py [--prompts 32 --n 4 --tokens 64 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import _common as C


async def tokens_per_second(channel, prompts, n, tokens, target) -> float:
    from rlhf.v1 import policy_pb2, policy_pb2_grpc

    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    req = policy_pb2.GenerateRequest(
        prompts=prompts,
        params=policy_pb2.SamplingParams(n=n, max_tokens=tokens, seed=0, ignore_eos=True),
        adapter=policy_pb2.AdapterSelector(target=target),
    )
    start = time.perf_counter()
    resp = await stub.Generate(req, timeout=3600)
    return resp.usage.completion_tokens / (time.perf_counter() - start)


async def measure(mode: str, adapter: Path, args) -> dict:
    from rlhf.clients.push import push_adapter
    from rlhf.v1 import policy_pb2, policy_pb2_grpc

    prompts = C.chat_prompts(args.prompts)
    adapter_mode, overrides = C.POLICY_MODES[mode]
    server, channel = await C.start_policy(adapter_mode, args.dtype, **overrides)
    try:
        base_id = server.app.config.resolved_base_model_id()
        active = policy_pb2.ADAPTER_TARGET_ACTIVE
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        # A full-size warm-up, then alternate base and adapter (switching the active version,
        # which in merged mode merges and unmerges) so drift on a shared machine hits both.
        await tokens_per_second(channel, prompts, args.n, 8, active)
        await push_adapter(channel, adapter, "speed", 1, base_id, activate=False)
        base_runs, adapter_runs = [], []
        for _ in range(args.rounds):
            await stub.SetActiveAdapter(policy_pb2.SetActiveAdapterRequest(base=True))
            base_runs.append(await tokens_per_second(channel, prompts, args.n, args.tokens,
                                                     active))
            await stub.SetActiveAdapter(policy_pb2.SetActiveAdapterRequest(
                adapter=policy_pb2.AdapterRef(name="speed", version=1)))
            adapter_runs.append(await tokens_per_second(channel, prompts, args.n, args.tokens,
                                                        active))
        base_tps, adapter_tps = max(base_runs), max(adapter_runs)
    finally:
        await channel.close()
        await server.shutdown()
    return {"base_tokens_per_s": round(base_tps, 1), "adapter_tokens_per_s": round(adapter_tps, 1),
            "ratio": round(adapter_tps / base_tps, 3)}


async def main(args) -> None:
    adapter = C.make_adapter(Path(tempfile.mkdtemp()) / "r16", r=16)
    figures = {}
    for mode in args.modes:
        figures[mode] = await measure(mode, adapter, args)
        f = figures[mode]
        print(f"{mode:7s} base {f['base_tokens_per_s']:7.1f} tokens/s, with adapter "
              f"{f['adapter_tokens_per_s']:7.1f} tokens/s, ratio {f['ratio']:.3f}")
    if "merged" in figures:
        print(f"merged ratio {figures['merged']['ratio']:.3f} (target >= 0.9)")
    if {"lora", "lora-vllm-ops"} <= set(figures):
        gain = (figures["lora"]["adapter_tokens_per_s"]
                / figures["lora-vllm-ops"]["adapter_tokens_per_s"])
        figures["lora_grouped_over_vllm_ops"] = round(gain, 3)
        print(f"lora mode with an adapter: grouped ops / vLLM's ops {gain:.2f}x")
    C.report("adapter_speed", {"prompts": args.prompts, "n": args.n, "tokens": args.tokens,
                               "dtype": args.dtype, "rank": 16, **figures})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", nargs="+", default=["lora", "lora-vllm-ops", "merged"],
                        choices=list(C.POLICY_MODES))
    asyncio.run(main(parser.parse_args()))
