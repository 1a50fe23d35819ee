"""The learner's loop against a real policy servicer (over the FakeEngine: no vLLM) and a real
rule reward: checkpoints every `checkpoint_every` steps and after the last, resuming (also over
steps that were pushed but not checkpointed), the base model id it pushes, TLS to its peers, and
closed channels at the end."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from rlhf.clients import GaveUp
from rlhf.plumbing.config import ClientTLS, ServerTLS
from rlhf.v1 import policy_pb2, policy_pb2_grpc
from services.trainer.ppo.learner import Hooks, Learner
from tests.fixtures.certs import make_pki
from tests.trainer.helpers import peers, run_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


async def versions_on_policy(addr: str, name: str) -> list[int]:
    async with grpc.aio.insecure_channel(addr) as ch:
        listed = await policy_pb2_grpc.PolicyServiceStub(ch).ListAdapters(
            policy_pb2.ListAdaptersRequest(name=name))
    return sorted(a.adapter.version for a in listed.adapters)


async def test_checkpoint_every_n_steps_and_after_the_last(tiny_model_dir, short_prompts,
                                                           tmp_path):
    out = tmp_path / "every2"
    events = []
    async with peers(tiny_model_dir, tmp_path) as (policy, reward):
        run = run_settings(tiny_model_dir, short_prompts, out, policy, reward, steps=3,
                           checkpoint_every=2)
        await Learner(run, Hooks(on_event=lambda k, m: events.append((k, m)))).run()
        # After step 2 (every 2) and step 3 (the last); none after step 1.
        assert saved_steps(out) == [2, 3]
        assert [m for k, m in events if k == "checkpoint_saved"] == [
            str(out / "checkpoints" / "step-2"), str(out / "checkpoints" / "step-3")]
        first = rows(out)
        assert [r["step"] for r in first] == [1, 2, 3]
        # Every step's adapter reached the policy, checkpointed or not.
        versions = [r["adapter/version"] for r in first]
        assert versions == [2, 3, 4]  # v1: the initial adapter
        assert await versions_on_policy(policy, out.name) == [1, 2, 3, 4]

        # A second run on the folder resumes after step 3.
        more = run.model_copy(update={"steps": 5})
        learner = Learner(more)
        await learner.run()
        assert saved_steps(out) == [2, 3, 4, 5]
        assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5]
        assert [r["adapter/version"] for r in rows(out)] == [2, 3, 4, 5, 6]
        assert learner.step == 5


async def test_resume_redoes_steps_after_the_checkpoint_under_new_versions(
    tiny_model_dir, short_prompts, tmp_path
):
    out = tmp_path / "crash"

    def crash_after_step_4(metrics: dict) -> None:
        if metrics["step"] == 4:
            raise RuntimeError("crash after step 4 was pushed")

    async with peers(tiny_model_dir, tmp_path) as (policy, reward):
        run = run_settings(tiny_model_dir, short_prompts, out, policy, reward, steps=5,
                           checkpoint_every=3)
        with pytest.raises(RuntimeError, match="crash after step 4"):
            await Learner(run, Hooks(on_metrics=crash_after_step_4)).run()
        assert saved_steps(out) == [3]
        before = rows(out)
        lost = before[3]
        assert lost["step"] == 4

        await Learner(run).run()
        done = rows(out)
        # Step 4 was done again from the step-3 checkpoint: one line per step, none twice.
        assert [r["step"] for r in done] == [1, 2, 3, 4, 5]
        assert done[:3] == before[:3]
        # Step 4's first adapter was pushed: the redone steps take new version numbers (a
        # replica never takes one twice) and the run ends on the newest.
        versions = [r["adapter/version"] for r in done]
        assert versions == sorted(versions) and done[3]["adapter/version"] > lost["adapter/version"]
        assert saved_steps(out) == [3, 5]
        assert (await versions_on_policy(policy, out.name))[-1] == versions[-1]


async def test_pushes_name_the_learners_own_base_model(tiny_model_dir, short_prompts, tmp_path):
    other = tmp_path / "another-model"  # the same weights under another model's name
    other.symlink_to(tiny_model_dir, target_is_directory=True)
    async with peers(tiny_model_dir, tmp_path) as (policy, reward):
        run = run_settings(other, short_prompts, tmp_path / "wrong-base", policy, reward)
        with pytest.raises(GaveUp) as err:
            await Learner(run).run()
        assert "'another-model'" in str(err.value) and tiny_model_dir.name in str(err.value)
        assert not (tmp_path / "wrong-base" / "metrics.jsonl").exists()

        # base_model_id names the base explicitly (a folder copied under another name).
        named = run_settings(other, short_prompts, tmp_path / "named", policy, reward, steps=1,
                             base_model_id=tiny_model_dir.name)
        await Learner(named).run()
        assert [r["step"] for r in rows(tmp_path / "named")] == [1]


async def test_talks_tls_to_its_peers_and_closes_its_channels(tiny_model_dir, short_prompts,
                                                               tmp_path):
    pki = make_pki(tmp_path)
    tls = ServerTLS(cert_file=pki.server_cert, key_file=pki.server_key)
    async with peers(tiny_model_dir, tmp_path, tls=tls) as (policy, reward):
        run = run_settings(tiny_model_dir, short_prompts, tmp_path / "tls", policy, reward,
                           steps=1, client_tls=ClientTLS(ca_file=pki.ca))
        learner = Learner(run)
        await learner.run()
        assert [r["step"] for r in rows(tmp_path / "tls")] == [1]
        assert learner.services.policy.closed and learner.services.reward.closed

        # Without the CA the same servers are not trusted.
        untrusted = run.model_copy(update={"out": tmp_path / "untrusted",
                                           "client_tls": ClientTLS(ca_file=pki.other_ca)})
        with pytest.raises(GaveUp):
            await Learner(untrusted).run()
