"""Security drills for how a version reaches users (issue 21, points 4 and 6): real policy gRPC
servers (FakeEngine) and a real reward server on 127.0.0.1, the learner's own push path.

- 21.4: a replica that fails staging (it serves another base model) leaves no replica on the new
  version: the others' staged copies are dropped and the version they served keeps serving;
- 21.6: a replica that answers with another adapter than the one pushed (its digest differs)
  is caught: the learner refuses those rollouts, trains nothing and stops with the reason.
"""

from __future__ import annotations

import json

import grpc
import pytest

from rlhf.clients import Backoff, GaveUp, PolicyClient
from rlhf.clients.push import push_adapter
from rlhf.v1 import policy_pb2
from services.trainer.ppo.delivery import NotDelivered
from services.trainer.ppo.learner import Hooks, Learner
from tests.fixtures.policy_helpers import ADMIN, SWAP_PROMPT, greedy, ids_prompt, pinned, stub
from tests.policy.conftest import start_fake_policy, stop_fake_policy
from tests.trainer.helpers import run_settings


@pytest.fixture
async def promotion_replicas(tiny_model_dir, tmp_path):
    """Two replicas: one on the run's base model, one that says it serves another."""
    good = await start_fake_policy(tiny_model_dir, tmp_path / "good")
    other = await start_fake_policy(tiny_model_dir, tmp_path / "other",
                                    base_model_id="another-base")
    yield good, other
    await stop_fake_policy(good)
    await stop_fake_policy(other)


@pytest.fixture
def promotion_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("the cat", "a dog")))
    return path


async def test_21_4_a_replica_that_fails_staging_leaves_none_on_the_new_version(
        promotion_replicas, tiny_adapters):
    """21.4: of two replicas, one refuses to stage v2 (an adapter of another base): the other
    replica's staged copy is dropped, both keep serving v1, and a request pinned to v2 is
    NOT_FOUND. Without the drop, the good replica would keep v2 and the replicas would differ."""
    good, other = promotion_replicas
    await push_adapter(good.channel, tiny_adapters[0], "prod", 1, "tiny", token=ADMIN)
    client = PolicyClient([good.addr, other.addr], backoff=Backoff(max_seconds=5))
    try:
        with pytest.raises(GaveUp) as err:
            await client.stage_and_commit(tiny_adapters[1], "prod", 2, "tiny", token=ADMIN,
                                          attempts=1)
    finally:
        await client.close()
    assert "no replica activates it" in str(err.value) and "another-base" in str(err.value)
    listed = await stub(good.channel).ListAdapters(policy_pb2.ListAdaptersRequest(name="prod"))
    assert [(a.adapter.version, a.active) for a in listed.adapters] == [(1, True)]
    request = policy_pb2.GenerateRequest(prompts=[ids_prompt(SWAP_PROMPT)], params=greedy(4))
    served = (await stub(good.channel).Generate(request)).results[0].served_by
    assert (served.adapter.name, served.adapter.version) == ("prod", 1)
    request.adapter.CopyFrom(pinned("prod", 2))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(good.channel).Generate(request)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_21_6_a_wrong_adapter_is_caught(promotion_replicas, tiny_model_dir,
                                              promotion_prompts, tmp_path):
    """21.6: a replica answers v1 with another adapter's bytes (its digest differs from the
    pushed one): the learner's delivery check raises NotDelivered naming the digest, and no step
    trains on those rollouts. Without the check the learner would train on them."""
    from tests.trainer.test_delivery import reward_server

    good, _ = promotion_replicas
    async with reward_server() as reward:
        run = run_settings(tiny_model_dir, promotion_prompts, tmp_path / "run", good.addr, reward,
                           steps=2)

        def on_event(kind, message):
            if kind == "adapter_pushed" and message.startswith("v1 active"):
                # The replica now answers v1 with another adapter's bytes (a second learner's,
                # an operator's mistake): its record of v1 names their digest.
                good.app.registry.existing(run.adapter_name, 1).sha256 = "e" * 64

        with pytest.raises(NotDelivered) as err:
            await Learner(run, Hooks(on_event=on_event)).run()
    assert "not delivered as trained" in str(err.value) and "eeeeeeee" in str(err.value)
    rows = (run.out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"delivery/ok": 0.0' in rows[0]  # nothing trained
