"""Helpers for the loop's tests: a reward server serving versioned reward models (`rm:@active`,
started from a given folder, with an admin token), answers stored in a real gateway's feedback
store, users' picks posted over HTTP, and `rlhf loop rm --once` run in a worker thread (it runs
its own event loop while the servers' loop keeps serving)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
from click.testing import CliRunner, Result

USER_KEY = "loop-user-key-0123456789"
ADMIN_KEY = "loop-admin-key-0123456789"
REWARD_TOKEN = "loop-reward-token-0123456789"


async def start_versioned_reward(store: Path, initial: Path, **overrides):
    """A reward server scoring with rm:@active, which starts as version `initial`."""
    from tests.fixtures.reward_helpers import start_reward

    settings = dict(rm_initial=initial, rm_store=store, admin_token=REWARD_TOKEN,
                    max_text_chars=4000)
    settings.update(overrides)
    return await start_reward(["rm:@active"], **settings)


async def reward_versions(handle) -> tuple[str, list[str]]:
    """(active version, kept versions) of a reward server."""
    from rlhf.v1 import reward_pb2, reward_pb2_grpc

    listed = await reward_pb2_grpc.RewardServiceStub(handle.channel).ListRewardModels(
        reward_pb2.ListRewardModelsRequest(), timeout=30)
    return listed.active, [m.version for m in listed.models]


def store_answers(db_url: str, answers: list[tuple[str, list[str]]], prefix: str,
                  key: str = USER_KEY) -> list[str]:
    """Stores (prompt, candidate texts) answers for `key`'s tenant in the gateway's feedback
    store, as best-of-n does; returns their request ids, PREFIX-0, PREFIX-1, ... (fixed ids
    fix the loop's split into training and held-out pairs, so a test sees the same round
    every time)."""
    from gateway.feedback import FeedbackStore, StoredCandidate
    from gateway.guard import key_id

    store = FeedbackStore(db_url)
    ids = []
    try:
        for i, (prompt, texts) in enumerate(answers):
            request_id = f"{prefix}-{i}"
            store.record_answer(request_id, "best_of_n", "policy", prompt, None,
                                [StoredCandidate(i, t, 0.0, "stop") for i, t in enumerate(texts)],
                                0, tenant=key_id(key))
            ids.append(request_id)
    finally:
        store.close()
    return ids


async def pick(url: str, request_id: str, index: int, key: str = USER_KEY) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        reply = await http.post("/v1/feedback", json={"request_id": request_id,
                                                      "chosen_index": index},
                                headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 201, reply.text


def good_bad_answers(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """Answers of two candidates: one with a 'good' word (index 0), one with a 'bad' word."""
    from tests.fixtures.reward_helpers import QUESTIONS, synthetic_pairs

    rng = random.Random(seed)
    return [(rng.choice(QUESTIONS), [p["chosen"], p["rejected"]])
            for p in synthetic_pairs(n, seed)]


async def run_loop(*args: str, env: dict | None = None) -> Result:
    """`rlhf loop rm --once ARGS` in a worker thread, on one torch thread."""
    from services.trainer.loop.cli import loop

    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, loop, ["rm", "--once", "--threads", "1",
                                                         *args], env=env)


def loop_args(gateway_url: str, reward_port: int, folder: Path, *extra: str) -> list[str]:
    return ["--gateway-url", gateway_url, "--reward-addr", f"127.0.0.1:{reward_port}",
            "--folder", str(folder), *extra]
