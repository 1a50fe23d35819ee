"""Security drills for the reward service's reward-model versions (22.3).

A real reward server on 127.0.0.1 serving `rm:@active` (the tiny trained reward model, stored as
version "initial") with an admin token. Each drill is an attack or a fault with its expected
refusal; after each, the active version still serves and nothing was stored.
"""

from __future__ import annotations

import json
import shutil

import grpc
import pytest

from rlhf.clients.reward import push_reward_model_requests
from rlhf.plumbing.auth import bearer_metadata
from rlhf.plumbing.config import ConfigError
from rlhf.v1 import reward_pb2
from services.reward.app import RewardApp
from services.reward.config import RewardConfig
from tests.fixtures.reward_helpers import item, score, start_reward, stub

REWARD_TOKEN = "reward-drill-token"
REWARD_AUTH = bearer_metadata(REWARD_TOKEN)


@pytest.fixture
async def reward_versioned(tiny_rm, tmp_path):
    handle = await start_reward(["rm:@active"], rm_store=tmp_path / "store",
                                rm_initial=tiny_rm.path, admin_token=REWARD_TOKEN,
                                max_rm_push_bytes=64 * 1024 * 1024)
    yield handle
    await handle.close()


def _reward_messages(folder, version: str, **header) -> list:
    messages = list(push_reward_model_requests(folder, version, chunk_bytes=256 * 1024))
    for key, value in header.items():
        setattr(messages[0].header, key, value)
    return messages


async def _reward_push(handle, messages, metadata=REWARD_AUTH):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(handle.channel).PushRewardModel(iter(messages), metadata=metadata,
                                                   timeout=120)
    return err.value


async def _reward_unchanged(handle) -> None:
    """Only "initial" is kept and active, it still scores, and no push left a folder."""
    listed = await stub(handle.channel).ListRewardModels(reward_pb2.ListRewardModelsRequest())
    assert [m.version for m in listed.models] == ["initial"] and listed.active == "initial"
    response = await score(handle.channel, [item("A nice answer.")])
    assert list(response.model_versions) == ["initial"]
    store = handle.app.config.rm_store_dir()
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [
        "initial", "state.json"]
    incoming = store / ".incoming"
    assert not incoming.exists() or not any(incoming.iterdir())


async def test_reward_model_push_and_switch_need_the_admin_token(reward_versioned, tiny_rm):
    """22.3: PushRewardModel without a token is UNAUTHENTICATED and with a wrong one
    PERMISSION_DENIED (the stream is never read); SetActiveRewardModel likewise. Without the
    interceptor on the reward server anyone reaching the port could swap the reward model."""
    messages = _reward_messages(tiny_rm.path, "evil")
    err = await _reward_push(reward_versioned, messages, metadata=())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = await _reward_push(reward_versioned, messages, metadata=bearer_metadata("guess"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "guess" not in err.details()
    with pytest.raises(grpc.aio.AioRpcError) as switch:
        await stub(reward_versioned.channel).SetActiveRewardModel(
            reward_pb2.SetActiveRewardModelRequest(version="initial"),
            metadata=bearer_metadata("guess"))
    assert switch.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await _reward_unchanged(reward_versioned)


def test_a_versioned_reward_service_starts_without_a_token_only_when_told_insecure(tmp_path):
    """22.3: a reward service serving rm:@active and no admin token refuses to start
    (ConfigError naming RLHF_REWARD_ADMIN_TOKEN) unless started with insecure_no_auth; one
    without rm:@active has no admin calls and needs none. Without require_admin_token the
    service would start with its push open to anyone."""
    cfg = RewardConfig.load(scorer=["rm:@active"], rm_store=tmp_path / "s", grpc_port=0,
                            metrics_port=0)
    with pytest.raises(ConfigError, match="RLHF_REWARD_ADMIN_TOKEN"):
        RewardApp(cfg)
    assert RewardApp(cfg.model_copy(update={"insecure_no_auth": True})).interceptors == ()
    RewardApp(RewardConfig.load(scorer=["rule:length?target=5"], grpc_port=0, metrics_port=0))


async def test_reward_model_push_beyond_the_size_bound_is_refused(reward_versioned, tiny_rm):
    """22.3: a push whose header announces more than max_rm_push_bytes is INVALID_ARGUMENT
    naming the bound, before a byte is stored (not RESOURCE_EXHAUSTED, which clients retry);
    one that sends more bytes than its header announced is INVALID_ARGUMENT once it passes the
    announced size. Without check_header's bound and
    receive's running count the server would write whatever a client streams."""
    messages = _reward_messages(tiny_rm.path, "big")
    header = messages[0].header
    header.files[0].size_bytes += 128 * 1024 * 1024
    header.size_bytes += 128 * 1024 * 1024
    err = await _reward_push(reward_versioned, messages)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_rm_push_bytes" in err.details()

    messages = _reward_messages(tiny_rm.path, "long")
    messages.append(reward_pb2.PushRewardModelRequest(data=b"x" * 1000))
    err = await _reward_push(reward_versioned, messages)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the" in err.details()
    await _reward_unchanged(reward_versioned)


async def test_reward_model_push_with_a_wrong_sha256_is_refused(reward_versioned, tiny_rm):
    """22.3: bytes that do not hash to the header's sha256 (altered in transit or by a
    middleman) are INVALID_ARGUMENT naming the mismatch, and nothing is kept. Without the hash
    check the altered model would load and serve."""
    messages = _reward_messages(tiny_rm.path, "tampered")
    last = messages[-1]
    last.data = bytes([last.data[0] ^ 0xFF]) + last.data[1:]
    err = await _reward_push(reward_versioned, messages)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256 mismatch" in err.details()
    await _reward_unchanged(reward_versioned)


@pytest.mark.parametrize("version", ["../escape", "a/b", ".hidden", "..", "", "x" * 65])
async def test_reward_model_versions_that_are_paths_are_refused(reward_versioned, tiny_rm,
                                                                 tmp_path, version):
    """22.3: a version name that would be a path (`..`, a `/`, a leading dot, empty, too long)
    is INVALID_ARGUMENT before a byte is stored, and nothing appears outside the store. Without
    check_version a push named `../escape` would write its folder beside the store."""
    err = await _reward_push(reward_versioned, _reward_messages(tiny_rm.path, version))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "version" in err.details()
    assert not (tmp_path / "escape").exists()
    await _reward_unchanged(reward_versioned)


@pytest.mark.parametrize("name", ["../config.json", "sub/config.json", ".env",
                                  "rlhf_rm_version.json"])
async def test_reward_model_file_names_that_are_paths_are_refused(reward_versioned, tiny_rm,
                                                                  tmp_path, name):
    """22.3: a file name in the header that is a path, hidden, or the store's own record is
    INVALID_ARGUMENT. Without the FILE_RE check `../config.json` would be written outside the
    staging folder (and the record file would be forged)."""
    messages = _reward_messages(tiny_rm.path, "files")
    messages[0].header.files[-1].name = name
    err = await _reward_push(reward_versioned, messages)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "file name" in err.details()
    await _reward_unchanged(reward_versioned)


async def test_a_lora_reward_model_over_a_foreign_base_is_refused(reward_versioned, tiny_rm,
                                                                 tmp_path):
    """22.3: a pushed LoRA reward model whose adapter_config.json names a base folder on the
    server that is not in rm_allowed_bases is refused (FAILED_PRECONDITION) before anything is
    loaded from that path. Without the check a push could make the service load any model
    folder it can read."""
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tiny_rm.path), "peft_type": "LORA"}))
    shutil.copy(next(tiny_rm.path.glob("*.safetensors")), folder / "adapter_model.safetensors")
    err = await _reward_push(reward_versioned, _reward_messages(folder, "lora"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not an allowed base" in err.details()
    await _reward_unchanged(reward_versioned)
