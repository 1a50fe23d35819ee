"""Gateway parts that need no upstream: ranking, model ids, the token bucket, config, and the
feedback store on a real SQLite file."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from gateway.cli import command
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.feedback import BadIndex, FeedbackStore, StoredCandidate, UnknownAnswer
from gateway.generation import chat_prompt, rank, score_item
from gateway.guard import TokenBuckets
from gateway.model_names import answered_by, selector_for, served_id
from gateway.schemas import Message
from rlhf.formats import text_prompt
from rlhf.plumbing.config import ConfigError
from rlhf.v1 import common_pb2, policy_pb2


def test_rank_orders_by_score_then_index_with_unscored_last():
    assert rank([0.2, 0.9, None, 0.9, -1.0]) == [1, 3, 0, 4, 2]
    assert rank([None, None]) == [0, 1]


def test_chat_roles_and_score_items():
    """Requests take OpenAI's roles ("developer" too, sent as the system turn) but not "tool"
    (no tool calling here); score items keep a chat prompt's turns and a text prompt's text."""
    Message(role="developer", content="Be brief.")
    with pytest.raises(ValidationError):
        Message(role="tool", content="42")
    prompt = chat_prompt([("developer", "Be brief."), ("user", "Hi")])
    assert [(m.role, m.content) for m in prompt.chat.messages] == [
        ("system", "Be brief."), ("user", "Hi")]
    chat_item = score_item(prompt, "Hello.")
    assert [m.role for m in chat_item.prompt_messages] == ["system", "user"]
    assert chat_item.completion == "Hello." and not chat_item.prompt
    assert score_item(text_prompt("Once"), "upon").prompt == "Once"
    ids = common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[5, 6]))
    assert score_item(ids, "x").prompt == "5 6"


def test_model_ids():
    assert selector_for("base", "policy").target == policy_pb2.ADAPTER_TARGET_BASE
    assert selector_for("policy", "policy").target == policy_pb2.ADAPTER_TARGET_ACTIVE
    pinned = selector_for("policy@v12", "run-a")
    assert (pinned.pinned.name, pinned.pinned.version) == ("run-a", 12)
    other = selector_for("sft@3", "policy")
    assert (other.pinned.name, other.pinned.version) == ("sft", 3)
    for bad in ("gpt-4", "policy@v0", "policy@", "../x@v1", ""):
        with pytest.raises(APIError) as err:
            selector_for(bad, "policy")
        assert err.value.status == 404
    served = policy_pb2.ServedBy(adapter=policy_pb2.AdapterRef(name="run-a", version=4))
    assert served_id(served, "run-a") == "policy@v4"
    assert served_id(policy_pb2.ServedBy(base=True), "run-a") == "base"


def test_an_answer_is_labelled_with_the_version_that_finished_it():
    """A merged-mode switch that lands during a call moves it to the new weights (the policy
    sets finished_by; tests/policy/test_merged.py): answers and stored feedback name that
    version, not the one the call started on."""
    v4 = policy_pb2.ServedBy(adapter=policy_pb2.AdapterRef(name="run-a", version=4))
    v5 = policy_pb2.ServedBy(adapter=policy_pb2.AdapterRef(name="run-a", version=5))
    plain = policy_pb2.PromptResult(served_by=v4)
    assert served_id(answered_by(plain), "run-a") == "policy@v4"
    moved = policy_pb2.PromptResult(served_by=v4, finished_by=v5)
    assert served_id(answered_by(moved), "run-a") == "policy@v5"
    from_base = policy_pb2.PromptResult(served_by=policy_pb2.ServedBy(base=True), finished_by=v4)
    assert served_id(answered_by(from_base), "run-a") == "policy@v4"


def test_token_bucket_allows_burst_then_refills_at_rate():
    now = [0.0]
    buckets = TokenBuckets(per_minute=60, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(1.0)  # one token per second
    assert buckets.take("b") == 0  # callers don't share buckets
    now[0] += 2.5
    assert buckets.take("a") == 0 and buckets.take("a") == 0
    assert buckets.take("a") > 0


def test_token_bucket_keeps_a_bounded_number_of_callers():
    buckets = TokenBuckets(per_minute=60, burst=1, max_keys=10, clock=lambda: 0.0)
    for i in range(100):
        buckets.take(f"k{i}")
    assert len(buckets._buckets) == 10


def test_config_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_GATEWAY_API_KEYS", "key-one-123456,key-two-123456")
    monkeypatch.setenv("RLHF_GATEWAY_POLICY_ADDR", "10.0.0.1:50051,10.0.0.2:50051")
    cfg = GatewayConfig.load(data_dir=tmp_path)
    assert cfg.api_keys == ["key-one-123456", "key-two-123456"]
    assert cfg.policy_addr == ["10.0.0.1:50051", "10.0.0.2:50051"]
    assert cfg.feedback_url() == f"sqlite:///{tmp_path}/gateway/feedback.db"
    monkeypatch.setenv("RLHF_GATEWAY_API_KEYS", "short")
    with pytest.raises(ConfigError, match="api_keys"):
        GatewayConfig.load()
    monkeypatch.delenv("RLHF_GATEWAY_API_KEYS")
    monkeypatch.setenv("RLHF_GATEWAY_API_KEY", "typo-in-the-name")
    with pytest.raises(ConfigError, match="RLHF_GATEWAY_API_KEY"):
        GatewayConfig.load()


def test_config_refuses_missing_or_unusable_peer_addresses(monkeypatch, tmp_path):
    """The gateway refuses to start without a usable policy or reward address, naming the key
    (GatewayConfig.load is what `rlhf serve gateway` calls before anything else)."""
    monkeypatch.setenv("RLHF_GATEWAY_POLICY_ADDR", "")
    with pytest.raises(ConfigError, match="policy_addr: .*no address given"):
        GatewayConfig.load(data_dir=tmp_path)
    monkeypatch.delenv("RLHF_GATEWAY_POLICY_ADDR")
    with pytest.raises(ConfigError, match="reward_addr: .*'reward' must be host:port"):
        GatewayConfig.load(data_dir=tmp_path, reward_addr=["reward"])
    with pytest.raises(ConfigError, match="reward_addr: .*IP literals"):
        GatewayConfig.load(data_dir=tmp_path, reward_addr=["a:1", "b:1"])
    ok = GatewayConfig.load(data_dir=tmp_path, policy_addr=["dns:///policy:50051"],
                            reward_addr=["10.0.0.1:50052,10.0.0.2:50052"])
    assert ok.reward_addr == ["10.0.0.1:50052", "10.0.0.2:50052"]
    result = CliRunner().invoke(command, ["--port", "0", "--data-dir", str(tmp_path),
                                          "--policy-addr", ""])
    assert result.exit_code != 0 and "policy_addr: " in result.output
    assert "no address given" in result.output and "RLHF_GATEWAY_POLICY_ADDR" in result.output


def test_feedback_store_exports_pairs_and_ratings(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    cands = [StoredCandidate(0, "alpha", 0.5, "stop"), StoredCandidate(1, "beta", 0.9, "stop"),
             StoredCandidate(2, "alpha", 0.5, "stop"), StoredCandidate(3, "", None, "stop")]
    tenant = {"tenant": "key:0123456789abcdef"}
    store.record_answer("r1", "best-of-n", "base", "the prompt", None, cands, best_index=1,
                        **tenant)
    store.record_feedback("r1", chosen_index=0, rating=None, candidate_index=None, comment=None,
                          **tenant)
    store.record_feedback("r1", chosen_index=None, rating=2, candidate_index=None, comment="meh",
                          **tenant)
    store.record_answer("r2", "best-of-n", "base", "the prompt", None, cands, best_index=1,
                        **tenant)
    store.record_feedback("r2", chosen_index=None, rating=5, candidate_index=0, comment=None,
                          **tenant)
    with pytest.raises(UnknownAnswer):
        store.record_feedback("zz", 0, None, None, None, **tenant)
    with pytest.raises(BadIndex):
        store.record_feedback("r1", 4, None, None, None, **tenant)
    pairs = list(store.export("preference"))
    # "alpha" vs itself (index 2) teaches nothing, a blank text can't be trained on: left out.
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("alpha", "beta")]
    ratings = [(r["response"], r["rating"]) for r in store.export("ratings")]
    assert ratings == [("beta", 2), ("alpha", 5)]  # a rating without an index is about the best
    assert json.dumps(pairs)  # plain JSON, ready for a JSONL file
    store.close()
    # A second store on the same file (another gateway process) sees the same data.
    again = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    assert len(list(again.export("preference"))) == 1
    again.close()
