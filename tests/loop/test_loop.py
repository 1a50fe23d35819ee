"""`rlhf loop rm --once` against a real gateway (HTTP, SQLite feedback store, admin key) and a real
reward server serving versioned reward models (tiny Llama): what a round pushes and when, the
cursor and state it leaves, the safety checks that refuse a version, a crash that repeats a round,
and the errors a user sees."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from services.trainer.loop.state import LoopFolder
from tests.gateway.helpers import closed_port, start_gateway
from tests.loop.helpers import (
    ADMIN_KEY,
    REWARD_TOKEN,
    USER_KEY,
    good_bad_answers,
    loop_args,
    pick,
    reward_versions,
    run_loop,
    start_versioned_reward,
    store_answers,
)

pytestmark = pytest.mark.slow

# Each round trains the tiny model in full: a few seconds on one thread.
TRAIN = ["--backbone", "full", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3",
         "--max-length", "64", "--heldout-fraction", "0.25", "--every-new-pairs", "10"]
SECRETS = {"RLHF_LOOP_ADMIN_KEY": ADMIN_KEY, "RLHF_LOOP_REWARD_TOKEN": REWARD_TOKEN}


class Env:
    def __init__(self, gateway, reward, tmp, tiny_rm):
        self.gateway, self.reward, self.tmp, self.tiny_rm = gateway, reward, tmp, tiny_rm
        self.db = f"sqlite:///{tmp / 'gw' / 'gateway' / 'feedback.db'}"
        self.folder = tmp / "loop"

    def args(self, *extra: str) -> list[str]:
        return loop_args(self.gateway.url, self.reward.server.port, self.folder,
                         "--init-model", str(self.tiny_rm.path), *TRAIN, *extra)

    async def answers_picked(self, n: int, seed: int, choose) -> list[str]:
        """n stored answers (good word at 0, bad at 1), each picked by `choose(i)`."""
        ids = store_answers(self.db, good_bad_answers(n, seed), f"s{seed}")
        for i, request_id in enumerate(ids):
            await pick(self.gateway.url, request_id, choose(i))
        return ids

    async def export_cursors(self) -> list[str]:
        async with httpx.AsyncClient(base_url=self.gateway.url, timeout=60) as http:
            reply = await http.get("/v1/feedback/export", params={"kind": "preference"},
                                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert reply.status_code == 200, reply.text
        return [json.loads(line)["cursor"] for line in reply.text.splitlines() if line]


@pytest.fixture
async def env(tmp_path, tiny_rm):
    reward = await start_versioned_reward(tmp_path / "store", tiny_rm.path)
    gateway = start_gateway(tmp_path / "gw", f"127.0.0.1:{closed_port()}",
                            f"127.0.0.1:{reward.server.port}", api_keys=[USER_KEY],
                            admin_api_keys=[ADMIN_KEY])
    yield Env(gateway, reward, tmp_path, tiny_rm)
    gateway.stop()
    await reward.close()


async def test_a_round_pushes_activates_and_moves_the_cursor_only_then(env):
    await env.answers_picked(40, seed=5, choose=lambda i: 0)
    result = await run_loop(*env.args("--seed-heldout", str(env.tiny_rm.val)), env=SECRETS)
    assert result.exit_code == 0, result.output
    assert "pushed and activated loop-1" in result.output

    active, kept = await reward_versions(env.reward)
    assert (active, kept) == ("loop-1", ["initial", "loop-1"])
    folder = LoopFolder(env.folder)
    state = folder.load_state()
    cursors = await env.export_cursors()
    assert state.cursor == cursors[-1] and state.active == "loop-1" and state.refused is None
    (record,) = folder.rounds()
    assert record["outcome"] == "pushed" and record["pairs"] == 40
    assert record["train_pairs"] + record["new_heldout_pairs"] == 40
    assert record["new_heldout_pairs"] > 0 and record["old_heldout_pairs"] == 100
    assert record["new_accuracy"] >= 0.6
    # The old held-out set now holds the seed and this round's new held-out pairs.
    assert len(folder.heldout()) == 100 + record["new_heldout_pairs"]
    assert (folder.version_dir("loop-1") / "config.json").exists()

    # No new pairs: nothing to do, exit 0, nothing pushed.
    again = await run_loop(*env.args(), env=SECRETS)
    assert again.exit_code == 0, again.output
    assert "nothing to do: 0 new" in again.output
    # Fewer than every_new_pairs: still nothing to do, and the cursor stays.
    await env.answers_picked(3, seed=6, choose=lambda i: 0)
    wait = await run_loop(*env.args(), env=SECRETS)
    assert wait.exit_code == 0 and "nothing to do: 3 new" in wait.output, wait.output
    assert folder.load_state().cursor == cursors[-1]
    assert (await reward_versions(env.reward))[1] == ["initial", "loop-1"]


async def test_the_next_round_warm_starts_from_the_version_it_pushed(env):
    await env.answers_picked(24, seed=7, choose=lambda i: 0)
    first = await run_loop(*env.args(), env=SECRETS)
    assert first.exit_code == 0, first.output
    await env.answers_picked(24, seed=8, choose=lambda i: 0)
    # The old held-out set is the first round's few pairs, where one flip is a 20-point drop:
    # this test is about where the round starts, not the check.
    second = await run_loop(*env.args("--max-accuracy-drop", "0.5"), env=SECRETS)
    assert second.exit_code == 0, second.output
    assert f"warm start from {env.folder / 'versions' / 'loop-1'}" in second.output
    assert (await reward_versions(env.reward))[0] == "loop-2"
    rounds = LoopFolder(env.folder).rounds()
    assert [r["pairs"] for r in rounds] == [24, 24]  # the second round saw only new pairs
    assert rounds[1]["active_version"] == "loop-1"


async def test_a_version_below_the_new_accuracy_floor_is_refused(env):
    coin = random.Random(3)
    await env.answers_picked(30, seed=9, choose=lambda i: coin.randrange(2))
    result = await run_loop(*env.args("--min-new-accuracy", "0.95"), env=SECRETS)
    assert result.exit_code == 3, result.output
    assert "below min_new_accuracy 0.95" in result.output
    assert await reward_versions(env.reward) == ("initial", ["initial"])
    state = LoopFolder(env.folder).load_state()
    assert state.cursor is None and state.refused == {"after": None, "pairs": 30}
    assert not (env.folder / "versions").exists() or not any((env.folder / "versions").iterdir())

    # The refused pairs are not retrained until every_new_pairs more arrive.
    again = await run_loop(*env.args("--min-new-accuracy", "0.95"), env=SECRETS)
    assert again.exit_code == 0 and "a round needs 40" in again.output, again.output


async def test_a_crash_after_the_push_repeats_the_round_and_skips_no_pair(env, monkeypatch):
    await env.answers_picked(24, seed=11, choose=lambda i: 0)
    real_save = LoopFolder.save_state

    def crash(self, state):
        raise RuntimeError("killed before the state was written")

    monkeypatch.setattr(LoopFolder, "save_state", crash)
    crashed = await run_loop(*env.args(), env=SECRETS)
    assert isinstance(crashed.exception, RuntimeError), crashed.output
    assert (await reward_versions(env.reward))[0] == "loop-1"  # pushed, state not written
    monkeypatch.setattr(LoopFolder, "save_state", real_save)

    repeated = await run_loop(*env.args(), env=SECRETS)
    assert repeated.exit_code == 0, repeated.output
    assert "pushed and activated loop-2" in repeated.output
    assert LoopFolder(env.folder).rounds()[-1]["pairs"] == 24  # the same pairs again
    assert LoopFolder(env.folder).load_state().cursor == (await env.export_cursors())[-1]


async def test_clear_errors_for_peers_that_refuse_or_are_missing(env):
    await env.answers_picked(12, seed=13, choose=lambda i: 0)
    # A tenant's own key may not export everyone's feedback.
    user = await run_loop(*env.args(), env={**SECRETS, "RLHF_LOOP_ADMIN_KEY": USER_KEY})
    assert user.exit_code == 1 and "refused the export (HTTP 403" in user.output, user.output
    # No gateway there.
    gone = await run_loop(*loop_args(f"http://127.0.0.1:{closed_port()}",
                                     env.reward.server.port, env.folder), env=SECRETS)
    assert gone.exit_code == 1 and "is unreachable" in gone.output, gone.output
    # The reward service's active version is not the loop's and no --init-model says where to
    # start.
    bare = await run_loop(*loop_args(env.gateway.url, env.reward.server.port, env.folder,
                                     *TRAIN), env=SECRETS)
    assert bare.exit_code == 1 and "give --init-model" in bare.output, bare.output
    # A wrong reward admin token: trained, refused by the reward service, nothing moves.
    wrong = await run_loop(*env.args(), env={**SECRETS, "RLHF_LOOP_REWARD_TOKEN": "nope"})
    assert wrong.exit_code == 1, wrong.output
    assert "did not take version loop-1" in wrong.output
    assert await reward_versions(env.reward) == ("initial", ["initial"])
    assert LoopFolder(env.folder).load_state().cursor is None
    for output in (user.output, gone.output, bare.output, wrong.output):
        assert "Traceback" not in output
