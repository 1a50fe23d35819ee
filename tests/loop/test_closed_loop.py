"""The closed loop end to end, on real services (tiny models): the session's vLLM policy, a reward
server whose first reward model (the tiny Llama trained on 'good'/'bad' word pairs) knows nothing
of the users' taste, a gateway with user and admin keys, and a GRPO run through the learner.

The users' taste: answers that mention a marker word, one of a few words of the tiny model's
vocabulary (whole tokens of 3+ letters that are part of no other token), picked greedily at run
time until the set is found in at least 40% of the base model's answers (the tiny model and the
seeds are fixed, so the set is the same every run). Scripted users ask
best-of-n (n=2) over HTTP and, when exactly one candidate has a marker, pick it.

While the GRPO run trains against the first reward model, `rlhf loop rm --once` pulls the pairs,
trains a warm-started reward model, checks it on held-out pairs and swaps it in; the run keeps
going. Stated outcomes:
- the run's steps record the reward-model version: the first steps `initial`, the last `loop-1`;
- the new reward model ranks held-out pairs right at least 75% of the time, and at least 15
  points more often than the first one did on the same pairs;
- the share of the policy's answers with a marker (24 seeded samples on each of the fixed
  prompts) is at least 10 points higher with the run's last adapter than with the adapter it
  had when the new reward model came in (the last one trained on the first model's scores).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from services.trainer.loop.state import LoopFolder
from services.trainer.ppo.learner import Hooks, Learner
from services.trainer.ppo.settings import PPOSettings
from tests.fixtures.policy_helpers import ADMIN
from tests.gateway.helpers import push_policy_version, start_gateway
from tests.loop.helpers import (
    ADMIN_KEY,
    REWARD_TOKEN,
    USER_KEY,
    loop_args,
    run_loop,
    start_versioned_reward,
)

# Minutes of work on a shared 2-core machine: users' requests, a 40-step run, a reward-model
# round and three rounds of sampling.
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]

ADAPTER = "closed-loop"
PROMPTS = ["Tell me about the sea.", "What is your name?", "Write a short poem.",
           "How are you today?", "Say something nice.", "What is the weather?",
           "Tell me a story.", "What do you like?", "Describe a bird.", "Where is the river?",
           "What did you read?", "Sing a song."]
MAX_TOKENS = 8
USER_REQUESTS = 480
MARKER_SHARE = 0.4
RM_ACCURACY = 0.75
RM_GAIN = 0.15
POLICY_GAIN = 0.10
# Long enough that most steps come after the swap on a slow, shared machine.
STEPS = 40
SWAP_VERSION = 10_000
HEADERS = {"Authorization": f"Bearer {USER_KEY}"}


async def best_of_n(http: httpx.AsyncClient, prompt: str, seed: int, model: str, n: int) -> dict:
    # A chat turn, as the run's {"prompt"} records are sent: users and rollouts see one policy.
    reply = await http.post("/v1/best-of-n", headers=HEADERS, json={
        "messages": [{"role": "user", "content": prompt}], "n": n, "max_tokens": MAX_TOKENS,
        "temperature": 1.0, "seed": seed, "model": model, "return_candidates": True})
    assert reply.status_code == 200, reply.text
    return reply.json()


def choose_markers(texts: list[str], model_dir) -> list[str]:
    """Greedily, marker words that together are in MARKER_SHARE of the texts: whole tokens of 3+
    letters found inside no other token (so a marker in a text is that token, which a reward
    model and a policy can learn)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = sorted({tokenizer.decode([i]).strip() for i in range(tokenizer.vocab_size)})
    pieces = [p for p in vocab if len(p) >= 3 and p.isalpha()
              and not any(p in other for other in vocab if other != p)]
    markers: list[str] = []

    def share(ws):
        return sum(any(w in t for w in ws) for t in texts) / len(texts)

    while share(markers) < MARKER_SHARE:
        markers.append(max((p for p in pieces if p not in markers),
                           key=lambda p: share([*markers, p])))
    return markers


async def marker_share(http: httpx.AsyncClient, model: str, markers: list[str]) -> float:
    gate = asyncio.Semaphore(4)

    async def ask(prompt: str, seed: int) -> dict:
        async with gate:
            return await best_of_n(http, prompt, seed, model, 8)

    answers = await asyncio.gather(*(ask(p, 1000 + 100 * k + i)
                                     for i, p in enumerate(PROMPTS) for k in range(3)))
    texts = [c["text"] for a in answers for c in a["candidates"]]
    return sum(any(m in t for m in markers) for t in texts) / len(texts)


async def test_users_feedback_retrains_and_swaps_the_reward_model_during_a_run(
        policy_lora, tiny_rm, tmp_path):
    reward = await start_versioned_reward(tmp_path / "store", tiny_rm.path)
    gateway = start_gateway(tmp_path / "gw", policy_lora.addr, f"127.0.0.1:{reward.server.port}",
                            api_keys=[USER_KEY], admin_api_keys=[ADMIN_KEY], max_n=8,
                            default_max_tokens=MAX_TOKENS, adapter_name=ADAPTER)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=300) as http:
            gate = asyncio.Semaphore(8)

            async def ask(i: int) -> dict:
                async with gate:
                    return await best_of_n(http, PROMPTS[i % len(PROMPTS)], i, "base", 2)

            answers = await asyncio.gather(*(ask(i) for i in range(USER_REQUESTS)))
            markers = choose_markers([c["text"] for a in answers for c in a["candidates"]],
                                     policy_lora.model_dir)
            picks = 0
            for answer in answers:
                marked = [c for c in answer["candidates"] if any(m in c["text"] for m in markers)]
                if len(marked) == 1:
                    reply = await http.post("/v1/feedback", headers=HEADERS, json={
                        "request_id": answer["request_id"], "chosen_index": marked[0]["index"]})
                    assert reply.status_code == 201, reply.text
                    picks += 1
            assert picks >= 150, picks
            before = await marker_share(http, "base", markers)
            print(f"markers {markers}: {picks} picks, share on the base model {before:.3f}",
                  flush=True)

            prompts = tmp_path / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
            out = tmp_path / ADAPTER
            run = PPOSettings.load(
                None, algo="grpo", model=policy_lora.model_dir, prompts=prompts, out=out,
                policy_addr=[policy_lora.addr], reward_addr=[f"127.0.0.1:{reward.server.port}"],
                admin_token=ADMIN, adapter_name=ADAPTER, steps=STEPS, prompts_per_step=8,
                samples_per_prompt=4, max_new_tokens=MAX_TOKENS, learning_rate=5e-3,
                kl_coef=0.0, seed=1, retry_max_seconds=120, keep_checkpoints=STEPS)
            steps_done: list[dict] = []
            learner = asyncio.create_task(
                Learner(run, Hooks(on_metrics=steps_done.append)).run())
            while not steps_done and not learner.done():
                await asyncio.sleep(0.2)
            started_at = len(steps_done)
            loop = await run_loop(
                *loop_args(gateway.url, reward.server.port, tmp_path / "loop",
                           "--init-model", str(tiny_rm.path), "--every-new-pairs", "40",
                           "--backbone", "full", "--epochs", "3", "--batch-size", "8",
                           "--lr", "1e-3", "--max-length", "64", "--heldout-fraction", "0.25",
                           "--min-new-accuracy", str(RM_ACCURACY)),
                env={"RLHF_LOOP_ADMIN_KEY": ADMIN_KEY, "RLHF_LOOP_REWARD_TOKEN": REWARD_TOKEN})
            swapped_at = len(steps_done)
            await learner
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            versions = [r.get("reward/model_version") for r in rows]
            rounds = LoopFolder(tmp_path / "loop").rounds()
            last = await marker_share(http, f"policy@v{rows[-1]['adapter/version']}", markers)
            # The adapter of the step before the first one scored by loop-1, back on the policy
            # (only the newest versions stay loaded) under a version of its own.
            first_new = next((r["step"] for r in rows if r.get("reward/model_version")
                              == "loop-1"), len(rows))
            await push_policy_version(policy_lora, out / "checkpoints" / f"step-{first_new - 1}"
                                      / "policy", SWAP_VERSION, ADAPTER)
            at_swap = await marker_share(http, f"policy@v{SWAP_VERSION}", markers)
            print(f"rounds {rounds}; loop from step "
                  f"{started_at} to {swapped_at}, reward versions by step {versions}; marker "
                  f"share: base {before:.3f}, at the swap {at_swap:.3f}, last adapter "
                  f"{last:.3f}")

            assert loop.exit_code == 0, loop.output
            assert "pushed and activated loop-1" in loop.output
            assert versions[0] == "initial" and versions[-1] == "loop-1", versions
            assert versions == sorted(versions, key=lambda v: v == "loop-1")  # one swap, kept
            (record,) = rounds
            assert record["new_accuracy"] >= RM_ACCURACY
            assert record["new_accuracy"] >= record["new_accuracy_before"] + RM_GAIN
            assert last >= at_swap + POLICY_GAIN
    finally:
        gateway.stop()
        await reward.close()
