"""Gateway overhead: best-of-4 latency through the HTTP gateway vs the same Generate + Score calls
made directly over gRPC, on the default model.

The two paths alternate request by request (same prompt, same seed), so machine noise hits both
alike. The gateway runs as its own process (`python -m gateway`), as it is deployed.
Target: p50 ratio <= 1.15.

    .venv/bin/python bench/gateway_overhead.py [--requests 40] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

from _common import QUESTIONS, median, percentile, report, start_policy

N = 4
SCORER = "rule:length?target=120&unit=chars"


async def main(args) -> None:
    import grpc
    import httpx

    from rlhf.plumbing.server import GrpcServer
    from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    policy_server, policy_channel = await start_policy()
    rcfg = RewardConfig.load(grpc_port=0, metrics_port=0, scorer=[SCORER])
    reward_server = await GrpcServer(rcfg, RewardApp(rcfg)).start()
    reward_channel = grpc.aio.insecure_channel(f"127.0.0.1:{reward_server.port}")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--port", "0",
         "--policy-addr", f"127.0.0.1:{policy_server.port}",
         "--reward-addr", f"127.0.0.1:{reward_server.port}", "--rate-limit-per-minute", "0",
         "--data-dir", os.environ.get("TMPDIR", "/tmp") + "/rlhf-bench-gateway",
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True)
    line = gateway.stdout.readline()
    if not line.startswith("READY gateway"):
        raise SystemExit(f"gateway did not start: {line!r}")
    url = "http://127.0.0.1:" + line.split("http=")[1].strip()
    policy = policy_pb2_grpc.PolicyServiceStub(policy_channel)
    reward = reward_pb2_grpc.RewardServiceStub(reward_channel)

    async def direct(question: str, seed: int) -> float:
        start = time.perf_counter()
        prompt = common_pb2.Prompt(chat=common_pb2.ChatConversation(
            messages=[common_pb2.ChatMessage(role="user", content=question)]))
        gen = await policy.Generate(policy_pb2.GenerateRequest(
            prompts=[prompt], params=policy_pb2.SamplingParams(
                n=N, max_tokens=args.max_tokens, temperature=1.0, seed=seed)))
        texts = [c.text for c in gen.results[0].completions if c.text]
        scores = await reward.Score(reward_pb2.ScoreRequest(items=[
            reward_pb2.ScoreItem(prompt_messages=prompt.chat.messages, completion=t)
            for t in texts]))
        max(s.score for s in scores.scores)
        return time.perf_counter() - start

    async def through_gateway(client: httpx.AsyncClient, question: str, seed: int) -> float:
        start = time.perf_counter()
        r = await client.post("/v1/best-of-n", json={
            "messages": [{"role": "user", "content": question}], "n": N,
            "max_tokens": args.max_tokens, "temperature": 1.0, "seed": seed})
        r.raise_for_status()
        return time.perf_counter() - start

    try:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            for i in range(3):  # warm-up: compile paths, fill caches, open connections
                await direct(QUESTIONS[i], i)
                await through_gateway(client, QUESTIONS[i], i)
            d_times, g_times = [], []
            for i in range(args.requests):
                q, seed = QUESTIONS[i % len(QUESTIONS)], 1000 + i
                if i % 2:
                    d_times.append(await direct(q, seed))
                    g_times.append(await through_gateway(client, q, seed))
                else:
                    g_times.append(await through_gateway(client, q, seed))
                    d_times.append(await direct(q, seed))
    finally:
        gateway.terminate()
        gateway.wait(30)
        await policy_channel.close()
        await reward_channel.close()
        await reward_server.shutdown()
        await policy_server.shutdown()

    figures = {
        "requests": args.requests, "n": N, "max_tokens": args.max_tokens,
        "direct_p50_s": round(median(d_times), 4),
        "direct_p99_s": round(percentile(d_times, 0.99), 4),
        "gateway_p50_s": round(median(g_times), 4),
        "gateway_p99_s": round(percentile(g_times, 0.99), 4),
    }
    figures["p50_ratio"] = round(figures["gateway_p50_s"] / figures["direct_p50_s"], 3)
    figures["p99_ratio"] = round(figures["gateway_p99_s"] / figures["direct_p99_s"], 3)
    figures["target_p50_ratio"] = 1.15
    print(f"best-of-{N}, {args.requests} requests each, alternating:")
    print(f"  direct gRPC   p50 {figures['direct_p50_s']:.3f}s  p99 {figures['direct_p99_s']:.3f}s")
    print(f"  via gateway   p50 {figures['gateway_p50_s']:.3f}s  "
          f"p99 {figures['gateway_p99_s']:.3f}s")
    print(f"  ratio p50 {figures['p50_ratio']:.3f} (target <= 1.15), "
          f"p99 {figures['p99_ratio']:.3f}")
    report("gateway_overhead", figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    asyncio.run(main(parser.parse_args()))
