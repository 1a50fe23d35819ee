"""Security drills for the reward-model loop (issue 22 point 4): real gateway (HTTP, SQLite store,
admin key) and a real reward server with versioned reward models (tiny Llama), `rlhf loop rm
--once` as a CronJob runs it.

- 22.4: a tenant posts poisoned feedback (always the answer a reward model should rank lower):
  the retrained model forgets what it knew, the loop refuses it, and the active version keeps
  serving;
- 22.4: the loop's secrets (gateway admin key, reward admin token) stay out of its settings'
  repr and out of what it prints when a peer refuses them.
"""

from __future__ import annotations

import pytest

from services.trainer.loop.settings import LoopSettings
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

LOOP_TRAIN = ["--backbone", "full", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3",
              "--max-length", "64", "--heldout-fraction", "0.25", "--every-new-pairs", "10"]


@pytest.fixture
async def loop_drill_peers(tmp_path, tiny_rm):
    reward = await start_versioned_reward(tmp_path / "store", tiny_rm.path)
    gateway = start_gateway(tmp_path / "gw", f"127.0.0.1:{closed_port()}",
                            f"127.0.0.1:{reward.server.port}", api_keys=[USER_KEY],
                            admin_api_keys=[ADMIN_KEY])
    yield gateway, reward, f"sqlite:///{tmp_path / 'gw' / 'gateway' / 'feedback.db'}"
    gateway.stop()
    await reward.close()


@pytest.mark.slow
async def test_poisoned_feedback_never_becomes_the_active_reward_model(loop_drill_peers,
                                                                       tmp_path, tiny_rm):
    """22.4: a tenant picks the answer with the 'bad' word every time. The model trained on it
    learns the poison (the new-pair floor is off here, so only the old-pairs check stands) and
    falls on the old held-out pairs (the first model's validation set): refused, exit 3, the
    active version unchanged, the cursor not moved."""
    gateway, reward, db = loop_drill_peers
    for request_id in store_answers(db, good_bad_answers(40, seed=21), "poison"):
        await pick(gateway.url, request_id, 1)
    folder = tmp_path / "loop"
    result = await run_loop(*loop_args(gateway.url, reward.server.port, folder,
                                       "--init-model", str(tiny_rm.path),
                                       "--seed-heldout", str(tiny_rm.val),
                                       "--min-new-accuracy", "0", "--max-accuracy-drop", "0.05",
                                       *LOOP_TRAIN),
                            env={"RLHF_LOOP_ADMIN_KEY": ADMIN_KEY,
                                 "RLHF_LOOP_REWARD_TOKEN": REWARD_TOKEN})
    assert result.exit_code == 3, result.output
    assert "accuracy on old held-out pairs fell" in result.output
    assert await reward_versions(reward) == ("initial", ["initial"])
    (record,) = LoopFolder(folder).rounds()
    assert record["outcome"] == "refused"
    assert record["old_accuracy"] < record["old_accuracy_before"] - 0.05
    assert LoopFolder(folder).load_state().cursor is None


@pytest.mark.slow
async def test_loop_secrets_stay_out_of_reprs_and_messages(loop_drill_peers, tmp_path):
    """22.4: the admin key and the reward token are not in the settings' repr, and a refused
    key is not echoed back in the loop's message."""
    gateway, reward, _ = loop_drill_peers
    settings = LoopSettings(gateway_url=gateway.url, admin_key=ADMIN_KEY,
                            reward_addr=[f"127.0.0.1:{reward.server.port}"],
                            reward_token=REWARD_TOKEN, folder=tmp_path / "loop")
    assert ADMIN_KEY not in repr(settings) and REWARD_TOKEN not in repr(settings)
    wrong = "loop-wrong-admin-key-987654321"
    result = await run_loop(*loop_args(gateway.url, reward.server.port, tmp_path / "loop"),
                            env={"RLHF_LOOP_ADMIN_KEY": wrong,
                                 "RLHF_LOOP_REWARD_TOKEN": REWARD_TOKEN})
    assert result.exit_code == 1 and "HTTP 401" in result.output, result.output
    assert wrong not in result.output and REWARD_TOKEN not in result.output
