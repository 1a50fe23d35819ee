"""Adapter hot swap under steady load, in each adapter mode: 20 pushes of an r=16 adapter of the
default model while clients keep generating on the active one (an adapter, from the start).
Prints push-to-first-served latency p50/p99 (from
the start of the push to the first token produced by the new version, seen by a probe that
streams one-token requests back to back; a probe request a merged-mode switch moved onto the new
weights counts for the new version), that p50 over the probe's own p50 with no push (a yardstick
that moves with the machine's speed), failed requests (must be 0), and the clients' p99 request
latency during swaps divided by their steady-state p99.
Targets: p50 <= 250 ms on this CPU, ratio <= 1.5.

    python bench/adapter_swap.py [--pushes 20 --clients 4 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import _common as C
import grpc


async def run_mode(mode: str, adapters: list[Path], args) -> dict:
    from rlhf.clients.push import push_adapter
    from rlhf.v1 import policy_pb2, policy_pb2_grpc

    server, channel = await C.start_policy(mode, args.dtype)
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    base_id = server.app.config.resolved_base_model_id()
    prompts = C.chat_prompts(args.clients)
    phase = {"name": "warmup"}
    latencies: dict[str, list[float]] = {"steady": [], "swap": []}
    probe_steady: list[float] = []  # the probe's one-token requests with no push: a yardstick
    first_served: dict[int, float] = {}
    failures: list[str] = []
    load_seconds: list[float] = []  # server side: upload end to servable
    push_seconds: list[float] = []  # client side: the whole PushAdapter call
    stop = asyncio.Event()

    async def client(i: int):
        req = policy_pb2.GenerateRequest(
            prompts=[prompts[i]],
            params=policy_pb2.SamplingParams(max_tokens=args.tokens, ignore_eos=True, seed=i))
        while not stop.is_set():
            start = time.perf_counter()
            try:
                await stub.Generate(req, timeout=120)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            if phase["name"] in latencies:
                latencies[phase["name"]].append(time.perf_counter() - start)

    async def probe():
        """Back-to-back one-token streams: when did the new version produce its first token?
        (The clients' whole requests would add their own duration to that moment.)"""
        req = policy_pb2.GenerateStreamRequest(
            prompt=prompts[0], params=policy_pb2.SamplingParams(max_tokens=1, seed=0))
        while not stop.is_set():
            served, token_at, start = None, None, time.perf_counter()
            try:
                async for msg in stub.GenerateStream(req, timeout=120):
                    if msg.HasField("served_by"):
                        served = msg.served_by
                    if msg.token_ids and token_at is None:
                        token_at = time.perf_counter()
                    if msg.HasField("finished_by"):
                        # A merged-mode switch landed while this request ran: its one token
                        # came from the new weights (see PromptResult.finished_by).
                        served = msg.finished_by
            except grpc.aio.AioRpcError as exc:
                failures.append(f"probe {exc.code().name}: {exc.details()}")
                continue
            if token_at is not None and served is not None and not served.base:
                first_served.setdefault(served.adapter.version, token_at)
            if phase["name"] == "steady" and token_at is not None:
                probe_steady.append(token_at - start)

    try:
        # Steady state serves an adapter too (v1), so the ratio measures swapping, not the
        # cost of adapter layers over the base model (that is bench/adapter_speed.py).
        await push_adapter(channel, adapters[0], "swap", 1, base_id)
        tasks = [asyncio.create_task(client(i)) for i in range(args.clients)]
        tasks.append(asyncio.create_task(probe()))
        await asyncio.sleep(args.warmup)
        phase["name"] = "steady"
        await asyncio.sleep(args.steady)
        phase["name"] = "swap"
        push_start: dict[int, float] = {}
        for version in range(2, args.pushes + 2):
            push_start[version] = time.perf_counter()
            resp = await push_adapter(channel, adapters[version % len(adapters)], "swap",
                                      version, base_id)
            load_seconds.append(resp.load_seconds)
            push_seconds.append(time.perf_counter() - push_start[version])
            await asyncio.sleep(args.gap)
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await channel.close()
        await server.shutdown()
    to_first = [first_served[v] - push_start[v] for v in push_start if v in first_served]
    steady_p99 = C.percentile(latencies["steady"], 0.99)
    swap_p99 = C.percentile(latencies["swap"], 0.99)
    first_p50 = C.percentile(to_first, 0.5)
    probe_p50 = C.percentile(probe_steady, 0.5)
    return {
        "pushes": args.pushes,
        "versions_served": len(to_first),
        "push_to_first_served_p50_ms": round(1000 * first_p50, 1),
        "push_to_first_served_p99_ms": round(1000 * C.percentile(to_first, 0.99), 1),
        # The machine's speed moves between runs; this moves with it much less.
        "probe_steady_p50_ms": round(1000 * probe_p50, 1),
        "first_served_over_probe_p50": round(first_p50 / probe_p50, 2),
        "load_p50_ms": round(1000 * C.percentile(load_seconds, 0.5), 1),
        "push_call_p50_ms": round(1000 * C.percentile(push_seconds, 0.5), 1),
        "failed_requests": len(failures),
        "steady_p99_ms": round(1000 * steady_p99, 1),
        "swap_p99_ms": round(1000 * swap_p99, 1),
        "p99_swap_over_steady": round(swap_p99 / steady_p99, 3),
        "requests": len(latencies["steady"]) + len(latencies["swap"]),
        "first_failures": failures[:3],
    }


async def main(args) -> None:
    root = Path(tempfile.mkdtemp())
    adapters = [C.make_adapter(root / f"a{i}", r=16, seed=i) for i in range(3)]
    figures = {}
    for mode in args.modes:
        f = figures[mode] = await run_mode(mode, adapters, args)
        print(f"{mode:7s} push->first served p50 {f['push_to_first_served_p50_ms']} ms, "
              f"p99 {f['push_to_first_served_p99_ms']} ms (target p50 <= 250; "
              f"{f['first_served_over_probe_p50']}x a steady one-token request); "
              f"failed {f['failed_requests']} (must be 0); p99 during swaps / steady "
              f"{f['p99_swap_over_steady']} (target <= 1.5)")
    C.report("adapter_swap", {"dtype": args.dtype, "rank": 16, "clients": args.clients,
                              "tokens": args.tokens, **figures})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--steady", type=float, default=10.0)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between pushes")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", nargs="+", default=["lora", "merged"])
    asyncio.run(main(parser.parse_args()))
