"""How a trained version reaches users, on two policy replicas (vLLM, lora mode) behind a gateway
with a reward service (rule:length, about as many characters as `--tokens` tokens make).

- immediate: from the end of a step (the adapter folder is written) to "active on all replicas":
  stage on both (sha256 checked, loaded), then activate on both (`promotion: immediate`);
- canary, good version (a random near-zero LoRA, as good as the active one): from staging to
  "promoted on all replicas" while `--clients` users keep sending `policy` requests, and how many
  requests that took;
- canary, bad version (SFT'd here to answer "No." to everything: scores ~0 on the length reward):
  from staging to "rolled back on all replicas" (unstaged, never active), and the share of
  requests it answered meanwhile (the bound is the gateway's canary_fraction).
Prints one JSON line.

    python bench/promotion.py [--model PATH|tiny] [--clients 4] [--fraction 0.1]
        [--min-requests 100] [--tokens 24] [--repeats 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as C

NAME = "policy"


def random_adapter(model: Path, out: Path, seed: int, r: int = 8) -> Path:
    """A LoRA adapter with small random B: answers much like the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                           target_modules=["q_proj", "k_proj", "v_proj",
                                                           "o_proj"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.001)
    peft.save_pretrained(out)
    return out


def bad_adapter(model: Path, out: Path, epochs: int) -> Path:
    """A version trained to please another reward than the gateway's: `rlhf train sft` on every
    question answered "No."."""
    data = out.parent / "no.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": "No."}]}) + "\n"
        for q in C.QUESTIONS))
    done = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "train", "sft", "--data", str(data), "--out", str(out),
         "--model", str(model), "--epochs", str(epochs), "--lr", "5e-3", "--no-packing"],
        capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training the bad adapter failed:\n{done.stderr[-2000:]}")
    return out


async def start_policy(model: Path, dtype: str, root: Path):
    from rlhf.plumbing.server import GrpcServer
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig

    cfg = PolicyConfig.load(
        grpc_port=0, metrics_port=0, model=model, data_dir=Path(tempfile.mkdtemp(dir=root)),
        dtype=dtype, adapter_mode="lora", max_model_len=1024, kv_cache_gib=1.0,
        max_pending_sequences=4096, insecure_no_auth=True)
    return await GrpcServer(cfg, PolicyApp(cfg)).start()


async def start_reward(spec: str):
    from rlhf.plumbing.server import GrpcServer
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    cfg = RewardConfig.load(grpc_port=0, metrics_port=0, scorer=[spec])
    return await GrpcServer(cfg, RewardApp(cfg)).start()


class Gateway:
    """The real gateway (uvicorn) on a thread and event loop of its own."""

    def __init__(self, config):
        self.config, self.port = config, None
        self._server, self._ready = None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import uvicorn

        from gateway.app import create_app

        async def main():
            self._server = uvicorn.Server(uvicorn.Config(
                create_app(self.config), host="127.0.0.1", port=0, log_config=None,
                access_log=False))
            task = asyncio.create_task(self._server.serve())
            while not self._server.started and not task.done():
                await asyncio.sleep(0.02)
            if self._server.started:
                self.port = self._server.servers[0].sockets[0].getsockname()[1]
            self._ready.set()
            await task

        asyncio.run(main())

    def __enter__(self) -> Gateway:
        self._thread.start()
        self._ready.wait(120)
        if self.port is None:
            raise SystemExit("the gateway did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(30)


class Users:
    """`clients` concurrent users sending `policy` requests (chat completions and best-of-n,
    chat prompts) until stopped; records which version answered each."""

    def __init__(self, url: str, clients: int, tokens: int):
        self.url, self.clients, self.tokens = url, clients, tokens
        self.served: list[str] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._turn = itertools.count()

    async def _user(self, client) -> None:
        while not self._stop.is_set():
            k = next(self._turn)
            messages = [{"role": "user", "content": C.QUESTIONS[k % len(C.QUESTIONS)]}]
            if k % 3 == 0:
                path, body = "/v1/best-of-n", {"messages": messages, "n": 2}
            else:
                path, body = "/v1/chat/completions", {"messages": messages}
            r = await client.post(path, json={"model": "policy", "max_tokens": self.tokens,
                                              **body})
            if r.status_code == 200:
                self.served.append(r.json()["model"])
            else:
                self.errors.append(f"{r.status_code} {r.text[:200]}")

    async def __aenter__(self) -> Users:
        import httpx

        self._client = httpx.AsyncClient(base_url=self.url, timeout=300)
        self._tasks = [asyncio.create_task(self._user(self._client))
                       for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()


async def until_all(policy, check, timeout: float) -> float:
    """Seconds until `check(listing)` holds on every replica."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        listings = [await policy.list_adapters(NAME, endpoint=ep, timeout=10)
                    for ep in policy.endpoints()]
        if all(check(lst) for lst in listings):
            return time.perf_counter()
        await asyncio.sleep(0.05)
    raise SystemExit(f"timed out after {timeout:g} s waiting on the replicas")


def active_is(version: int):
    return lambda lst: not lst.active.base and lst.active.adapter.version == version


def settled(version: int):
    """Promoted (active) or rolled back (neither staged nor active, or no longer kept)."""
    def check(lst) -> bool:
        info = next((a for a in lst.adapters if a.adapter.version == version), None)
        return info is None or info.active or not info.staged
    return check


async def canary_run(policy, gateway: Gateway, folder: Path, version: int, base_id: str,
                     args) -> dict:
    """Stages `version` for the gateway's canary under load until it is promoted or rolled
    back on every replica; returns its figures."""
    import httpx

    async with Users(f"http://127.0.0.1:{gateway.port}", args.clients, args.tokens) as users:
        await asyncio.sleep(args.warmup)
        before = len(users.served)
        start = time.perf_counter()
        await policy.stage_and_commit(folder, NAME, version, base_id, stage_seconds=3600,
                                      commit=False)
        done = await until_all(policy, settled(version), args.timeout)
        during = users.served[before:]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}") as c:
        status = (await c.get("/v1/admin/canary")).json()
    verdict = next((d for d in reversed(status["decisions"]) if d["version"] == version), {})
    candidate = sum(1 for m in during if m == f"policy@v{version}")
    return {"seconds": round(done - start, 2), "requests": len(during),
            "candidate_answers": candidate,
            "candidate_share": round(candidate / len(during), 4) if during else None,
            "decision": verdict.get("decision"), "reasons": verdict.get("reasons"),
            "arms": verdict.get("arms"), "errors": len(users.errors)}


async def run(args, model: Path, root: Path) -> dict:
    from gateway.config import GatewayConfig
    from rlhf.clients import PolicyClient

    print("adapters: incumbent, good (random near-zero), bad (SFT on 'No.')", flush=True)
    incumbent = random_adapter(model, root / "incumbent", seed=1)
    good = random_adapter(model, root / "good", seed=2)
    bad = bad_adapter(model, root / "bad", args.sft_epochs)
    reward = await start_reward(f"rule:length?target={4 * args.tokens}&unit=chars")
    replicas = [await start_policy(model, args.dtype, root) for _ in range(2)]
    addrs = [f"127.0.0.1:{r.port}" for r in replicas]
    base_id = replicas[0].app.config.resolved_base_model_id()
    policy = PolicyClient(addrs, timeout=120)
    figures: dict = {}
    try:
        await policy.stage_and_commit(incumbent, NAME, 1, base_id)
        version = 1
        immediate = []
        for _ in range(args.repeats):
            version += 1
            start = time.perf_counter()
            await policy.stage_and_commit(good, NAME, version, base_id)
            immediate.append(await until_all(policy, active_is(version), args.timeout) - start)
        figures["immediate_seconds_median"] = round(C.median(immediate), 3)
        figures["immediate_seconds"] = [round(s, 3) for s in immediate]
        print(f"immediate: active on both replicas {figures['immediate_seconds_median']} s "
              "after the step's adapter was written (median)", flush=True)
        config = GatewayConfig.load(
            http_port=0, policy_addr=addrs, reward_addr=[f"127.0.0.1:{reward.port}"],
            data_dir=root / "gateway", rate_limit_per_minute=0, upstream_timeout_seconds=300,
            canary_fraction=args.fraction, canary_min_requests=args.min_requests,
            canary_max_seconds=args.timeout, canary_poll_seconds=0.5)
        with Gateway(config) as gateway:
            figures["canary_good"] = await canary_run(policy, gateway, good, version + 1,
                                                      base_id, args)
            g = figures["canary_good"]
            print(f"canary, good version: {g['decision']} after {g['seconds']} s and "
                  f"{g['requests']} requests ({g['candidate_answers']} by it)", flush=True)
            figures["canary_bad"] = await canary_run(policy, gateway, bad, version + 2,
                                                     base_id, args)
            b = figures["canary_bad"]
            print(f"canary, bad version: {b['decision']} after {b['seconds']} s; it answered "
                  f"{b['candidate_answers']} of {b['requests']} requests "
                  f"({b['candidate_share']}; bound {args.fraction})", flush=True)
    finally:
        await policy.close()
        for server in (*replicas, reward):
            await server.shutdown()
    return figures


def main(args) -> None:
    from vs_trl import resolve_model

    root = Path(tempfile.mkdtemp(prefix="promotion-"))
    try:
        model = resolve_model(args.model, root)
        figures = asyncio.run(run(args, model, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    C.report("promotion", {
        "model": str(args.model or C.default_model()), "replicas": 2, "dtype": args.dtype,
        "clients": args.clients, "tokens": args.tokens, "canary_fraction": args.fraction,
        "canary_min_requests": args.min_requests, **figures})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="Model folder (default: the prepared SmolLM2), or 'tiny'")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--min-requests", type=int, default=100,
                        help="The gateway's canary_min_requests (scored answers per arm)")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="immediate promotions timed")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of load before each canary starts")
    parser.add_argument("--sft-epochs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="canary_max_seconds, and the wait on the replicas")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    main(parser.parse_args())
