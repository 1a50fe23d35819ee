"""Reward-model versions on a real reward server on 127.0.0.1 (scorer `rm:@active`, the tiny
trained reward model): start from a folder, push, list, activate, roll back, every Score naming
its version, state kept over a restart (damaged entries set aside), broken pushes refused while
the active version keeps serving, a switch under concurrent Score calls, the normaliser starting
afresh per version, the metrics, and the PPO learner recording the version per step."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf.clients.errors import CallFailed
from rlhf.clients.retry import Backoff
from rlhf.clients.reward import RewardClient
from services.reward.items import Item
from services.reward.rm import RewardModel
from tests.fixtures.reward_helpers import item, metric_value, score, start_reward

TOKEN = "reward-admin-token"
PROMPT = "How was your day?"
TEXTS = ["We find good music.", "The robot builds a small sad house today", "Yes, nice.",
         "Our team writes a new song, awful", "The child knows the river"]
SCALE = 3.0  # version "v2" is the initial model with its score head times SCALE


def _with_head(source: Path, out: Path, change) -> Path:
    """A copy of a reward-model folder whose score head is `change(head)`."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("checkpoint*", "metrics.jsonl"))
    for weights in out.glob("*.safetensors"):
        tensors = load_file(weights)
        heads = [k for k in tensors if k.split(".")[0] == "score"]
        if heads:
            for key in heads:
                tensors[key] = change(tensors[key])
            save_file(tensors, weights, metadata={"format": "pt"})
            return out
    raise AssertionError(f"no score head in {source}")


@pytest.fixture(scope="module")
def rm_folders(tiny_rm, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rm-versions")
    truncated = root / "truncated"
    shutil.copytree(tiny_rm.path, truncated,
                    ignore=shutil.ignore_patterns("checkpoint*", "metrics.jsonl"))
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    return {
        "v1": tiny_rm.path,
        "v2": _with_head(tiny_rm.path, root / "v2", lambda h: h * SCALE),
        "nan": _with_head(tiny_rm.path, root / "nan", lambda h: h * float("nan")),
        "truncated": truncated,
    }


@pytest.fixture(scope="module")
def direct_scores(rm_folders) -> dict[str, list[float]]:
    """What each good version scores TEXTS to, straight from the model."""
    out = {}
    for name in ("v1", "v2"):
        model = RewardModel(rm_folders[name])
        model.load()
        out[name] = model.score([Item(t, prompt=PROMPT) for t in TEXTS])
    return out


async def start_versioned(store: Path, **overrides):
    return await start_reward(["rm:@active"], rm_store=store, admin_token=TOKEN,
                              max_text_chars=2000, **overrides)


def client_of(handle, token: str | None = TOKEN) -> RewardClient:
    return RewardClient(f"127.0.0.1:{handle.server.port}", token=token,
                        backoff=Backoff(max_seconds=0))


async def score_texts(handle):
    return await score(handle.channel, [item(t, prompt=PROMPT) for t in TEXTS])


def rm_parts(response) -> list[float]:
    return [s.by_scorer[0].score for s in response.scores]


@pytest.fixture
async def versioned(rm_folders, tmp_path):
    """A reward server that starts from the v1 folder (stored as version "initial")."""
    handle = await start_versioned(tmp_path / "store", rm_initial=rm_folders["v1"])
    client = client_of(handle)
    yield handle, client
    await client.close()
    await handle.close()


async def test_starts_from_a_folder_and_every_score_names_its_version(versioned,
                                                                      direct_scores):
    handle, client = versioned
    response = await score_texts(handle)
    assert list(response.model_versions) == ["initial"]
    assert {s.by_scorer[0].model_version for s in response.scores} == {"initial"}
    assert rm_parts(response) == pytest.approx(direct_scores["v1"], abs=1e-4)
    listed = await client.list_reward_models()
    assert listed.active == "initial"
    assert [(m.version, m.active) for m in listed.models] == [("initial", True)]


async def test_push_activate_rollback_and_metrics(versioned, rm_folders, direct_scores):
    handle, client = versioned
    pushed = await client.push_reward_model(rm_folders["v2"], "v2", heldout_accuracy=0.875,
                                            metadata={"pairs": "120"})
    assert pushed.activated and pushed.model.version == "v2" and pushed.model.active
    response = await score_texts(handle)
    assert list(response.model_versions) == ["v2"]
    assert rm_parts(response) == pytest.approx(direct_scores["v2"], abs=1e-4)
    assert rm_parts(response) == pytest.approx([SCALE * x for x in direct_scores["v1"]],
                                               abs=1e-3)

    listed = await client.list_reward_models()
    assert [m.version for m in listed.models] == ["initial", "v2"] and listed.active == "v2"
    v2 = listed.models[1]
    assert v2.heldout_accuracy == pytest.approx(0.875) and dict(v2.metadata) == {"pairs": "120"}
    assert not listed.models[0].HasField("heldout_accuracy")
    assert metric_value("rlhf_reward_model_active", {"version": "v2"}) == 1
    assert metric_value("rlhf_reward_model_active", {"version": "initial"}) == 0
    assert metric_value("rlhf_reward_model_heldout_accuracy", {"version": "v2"}) == 0.875

    # Rollback: any kept version can be made active again.
    switched = await client.set_active_reward_model("initial")
    assert (switched.previous, switched.active) == ("v2", "initial")
    response = await score_texts(handle)
    assert list(response.model_versions) == ["initial"]
    assert rm_parts(response) == pytest.approx(direct_scores["v1"], abs=1e-4)
    assert metric_value("rlhf_reward_model_active", {"version": "initial"}) == 1

    # A version kept but not activated; re-pushing the same bytes changes nothing.
    again = await client.push_reward_model(rm_folders["v2"], "v2", activate=False)
    assert not again.activated and again.model.sha256 == v2.sha256
    with pytest.raises(CallFailed) as err:
        await client.set_active_reward_model("v9")
    assert err.value.code.name == "NOT_FOUND" and "initial, v2" in str(err.value)
    with pytest.raises(CallFailed) as err:  # another folder under a kept name
        await client.push_reward_model(rm_folders["v1"], "v2")
    assert err.value.code.name == "ALREADY_EXISTS"


async def test_restart_keeps_state_and_sets_damaged_entries_aside(rm_folders, tmp_path,
                                                                  direct_scores):
    store = tmp_path / "store"
    handle = await start_versioned(store, rm_initial=rm_folders["v1"])
    client = client_of(handle)
    await client.push_reward_model(rm_folders["v2"], "v2")
    await client.push_reward_model(rm_folders["v1"], "v3", activate=False)
    await client.close()
    await handle.close()

    # Damage: a folder without its record, a version with a file cut short, a foreign file.
    (store / "stray").mkdir()
    (store / "stray" / "config.json").write_text("{}")
    weights = next((store / "v3").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])

    handle = await start_versioned(store)  # no initial folder: the stored state decides
    client = client_of(handle)
    try:
        listed = await client.list_reward_models()
        assert listed.active == "v2"
        assert [m.version for m in listed.models] == ["initial", "v2"]
        aside = sorted(p.name.split("-", 2)[2] for p in (store / ".set-aside").iterdir())
        assert aside == ["stray", "v3"]
        response = await score_texts(handle)
        assert list(response.model_versions) == ["v2"]
        assert rm_parts(response) == pytest.approx(direct_scores["v2"], abs=1e-4)
    finally:
        await client.close()
        await handle.close()

    # A damaged state.json is set aside too; the newest version that loads serves.
    (store / "state.json").write_text("{not json")
    handle = await start_versioned(store)
    try:
        response = await score_texts(handle)
        assert list(response.model_versions) == ["v2"]
    finally:
        await handle.close()


@pytest.mark.parametrize("broken", ["nan", "truncated"])
async def test_a_broken_push_is_refused_and_the_active_version_keeps_serving(
        versioned, rm_folders, broken, direct_scores):
    handle, client = versioned
    with pytest.raises(CallFailed) as err:
        await client.push_reward_model(rm_folders[broken], "bad")
    assert err.value.code.name == "FAILED_PRECONDITION"
    assert "reward-model version bad refused" in str(err.value)
    listed = await client.list_reward_models()
    assert [m.version for m in listed.models] == ["initial"] and listed.active == "initial"
    store = handle.app.config.rm_store_dir()
    assert not (store / "bad").exists() and not any((store / ".incoming").iterdir())
    response = await score_texts(handle)
    assert list(response.model_versions) == ["initial"]
    assert rm_parts(response) == pytest.approx(direct_scores["v1"], abs=1e-4)


async def test_switch_under_concurrent_score_calls_fails_none(versioned, rm_folders,
                                                              direct_scores):
    handle, client = versioned
    await client.push_reward_model(rm_folders["v2"], "v2", activate=False)
    expected = {"initial": direct_scores["v1"], "v2": direct_scores["v2"]}
    seen: list[tuple[str, list[float]]] = []
    done = asyncio.Event()

    async def caller():
        while not done.is_set():
            response = await score_texts(handle)  # any failure raises and fails the test
            seen.append((response.model_versions[0], rm_parts(response)))

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    try:
        for target in ["v2", "initial", "v2", "initial", "v2"]:
            await asyncio.sleep(0.2)
            await client.set_active_reward_model(target)
        await asyncio.sleep(0.2)
    finally:
        done.set()
        await asyncio.gather(*callers)
    assert {version for version, _ in seen} == {"initial", "v2"}
    # Each call was scored wholly by the version it names.
    for version, parts in seen:
        assert parts == pytest.approx(expected[version], abs=1e-4)


async def test_normaliser_starts_afresh_per_version(rm_folders, tmp_path):
    handle = await start_versioned(tmp_path / "store", rm_initial=rm_folders["v1"],
                                   normalize="rm")
    client = client_of(handle)
    try:
        for _ in range(3):
            await score_texts(handle)
        await client.push_reward_model(rm_folders["v2"], "v2")
        # The first call on v2 is standardised by its own scores only: mean 0, std 1. Under
        # v1's statistics, v2's (SCALE times larger) scores would be spread far wider.
        parts = rm_parts(await score_texts(handle))
        assert statistics.fmean(parts) == pytest.approx(0.0, abs=1e-6)
        assert statistics.pstdev(parts) == pytest.approx(1.0, abs=1e-3)
    finally:
        await client.close()
        await handle.close()


async def test_starts_without_a_version_and_serves_once_one_is_pushed(rm_folders, tmp_path):
    handle = await start_versioned(tmp_path / "store")
    client = client_of(handle)
    try:
        with pytest.raises(CallFailed) as err:
            await client.score([item("hello")])
        assert err.value.code.name == "FAILED_PRECONDITION" and "PushRewardModel" in str(
            err.value)
        await client.push_reward_model(rm_folders["v1"], "first")
        response = await client.score_response([item("hello")])
        assert list(response.model_versions) == ["first"]
        kept = json.loads((tmp_path / "store" / "state.json").read_text())
        assert kept == {"active": "first"}
    finally:
        await client.close()
        await handle.close()


async def test_the_learner_records_the_reward_version_of_each_step(
        rm_folders, tiny_model_dir, tmp_path):
    from services.trainer.ppo.learner import Learner
    from tests.trainer.helpers import peers, run_settings

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ["the cat", "a dog", "hello", "red apple"]))
    reward = await start_versioned(tmp_path / "store", rm_initial=rm_folders["v1"])
    client = client_of(reward)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        async with peers(tiny_model_dir, tmp_path) as (policy, _):
            out = tmp_path / "run"
            address = f"127.0.0.1:{reward.server.port}"
            run = run_settings(tiny_model_dir, prompts, out, policy, address, steps=1)
            await Learner(run).run()
            await client.push_reward_model(rm_folders["v2"], "v2")
            await Learner(run.model_copy(update={"steps": 2})).run()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["reward/model_version"]) for r in rows] == [(1, "initial"),
                                                                        (2, "v2")]
    finally:
        torch.set_num_threads(before)
        await client.close()
        await reward.close()
