"""RewardService on a real gRPC server on 127.0.0.1: the weighted sum and each scorer's part, chat
prompts, determinism, GetInfo, normalisation, user functions (good and bad), every bad input,
start-up failures, and the metrics."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys

import grpc
import pytest

from rlhf.plumbing.errors import FailedPrecondition
from rlhf.v1 import common_pb2, reward_pb2
from services.reward.items import Item
from services.reward.rm import RewardModel
from tests.fixtures.reward import REWARD_SCORERS
from tests.fixtures.reward_helpers import (
    by_name,
    item,
    metric_value,
    score,
    start_reward,
    stub,
)

LENGTH, WORDS = "rule:length?target=6", "python:tests.fixtures.reward_helpers:word_count"


def rm_name(tiny_rm) -> str:
    return f"rm:{tiny_rm.path}"


async def expect_error(channel, items, code: grpc.StatusCode, *fragments: str):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await score(channel, items)
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details(), err.value.details()
    return err.value


async def test_score_gives_weighted_sum_and_each_scorers_part(reward_server, tiny_rm):
    completions = ["We find good music.", "The robot builds a small sad house today"]
    resp = await score(reward_server.channel, [item(c, prompt="How was your day?")
                                               for c in completions])
    assert len(resp.scores) == 2 and len(resp.request_id) > 0
    direct = RewardModel(tiny_rm.path)
    direct.load()
    expected_rm = direct.score([Item(c, prompt="How was your day?") for c in completions])
    for s, completion, rm_score in zip(resp.scores, completions, expected_rm, strict=True):
        names = [p.scorer for p in s.by_scorer]
        assert names == [rm_name(tiny_rm), LENGTH, WORDS]  # configuration order
        assert [p.weight for p in s.by_scorer] == [1.0, 0.5, 1.0]
        parts = by_name(s)
        words = len(completion.split())
        assert parts[WORDS] == words
        assert parts[LENGTH] == pytest.approx(max(0.0, 1 - abs(words - 6) / 6))
        assert parts[rm_name(tiny_rm)] == pytest.approx(rm_score, abs=1e-5)
        assert s.score == pytest.approx(sum(p.weight * p.score for p in s.by_scorer), rel=1e-12)
    # The trained model prefers the "good" answer.
    assert by_name(resp.scores[0])[rm_name(tiny_rm)] > by_name(resp.scores[1])[rm_name(tiny_rm)]


async def test_chat_prompts_and_determinism(reward_server, tiny_rm):
    text = item("We find good music.", prompt="How was your day?")
    chat = item("We find good music.", messages=[("user", "How was your day?")])
    with_system = item("We find good music.",
                       messages=[("system", "Be kind."), ("user", "How was your day?")])
    a = await score(reward_server.channel, [text, chat, with_system])
    b = await score(reward_server.channel, [text, chat, with_system])
    assert [s.score for s in a.scores] == [s.score for s in b.scores]  # same input, same score
    rm = rm_name(tiny_rm)
    # A text prompt is read as one user turn: the same rendering as that chat.
    assert by_name(a.scores[0])[rm] == pytest.approx(by_name(a.scores[1])[rm], abs=1e-6)
    assert by_name(a.scores[2])[rm] != pytest.approx(by_name(a.scores[0])[rm], abs=1e-6)


async def test_get_info_lists_scorers_and_limits(reward_server, tiny_rm):
    info = await stub(reward_server.channel).GetInfo(reward_pb2.RewardServiceGetInfoRequest())
    assert info.server.service == "reward" and info.server.ready
    assert [(s.name, s.kind, s.weight, s.normalized) for s in info.scorers] == [
        (rm_name(tiny_rm), "rm", 1.0, False), (LENGTH, "rule", 0.5, False),
        (WORDS, "python", 1.0, False)]
    assert (info.max_batch_items, info.max_text_chars) == (64, 2000)


async def test_bad_input_is_invalid_argument(reward_server):
    ch, bad = reward_server.channel, grpc.StatusCode.INVALID_ARGUMENT
    ok = item("fine")
    await expect_error(ch, [], bad, "items is empty")
    await expect_error(ch, [ok] * 65, bad, "65 items", "at most 64")
    await expect_error(ch, [ok, item("")], bad, "items[1].completion is empty")
    await expect_error(ch, [item("x", prompt="")], bad, "items[0]", "prompt is empty")
    both = reward_pb2.ScoreItem(prompt="p", completion="x",
                                prompt_messages=[common_pb2.ChatMessage(role="user", content="p")])
    await expect_error(ch, [both], bad, "not both")
    await expect_error(ch, [item("x" * 2001)], bad, "items[0].completion has 2001 characters")
    await expect_error(ch, [item("x", prompt="p" * 2001)], bad, "items[0].prompt")
    await expect_error(ch, [item("x", messages=[("user", "a" * 1500), ("user", "b" * 600)])],
                       bad, "prompt_messages have 2100 characters")
    await expect_error(ch, [item("x", messages=[("robot", "hi")])], bad, "'robot'")
    await expect_error(ch, [item("x", messages=[("user", "")])], bad, "user turn with no content")
    await expect_error(ch, [item("x", reference="r" * 2001)], bad, "items[0].reference")
    await expect_error(ch, [item("x", prompts="clash")], bad, "reserved")
    # Still serving afterwards.
    assert len((await score(ch, [ok])).scores) == 1


async def test_user_functions_that_misbehave_fail_the_call_and_service_goes_on():
    flaky = "python:tests.fixtures.reward_helpers:flaky"
    handle = await start_reward(["rule:length?target=2", flaky])
    try:
        ch, internal = handle.channel, grpc.StatusCode.INTERNAL
        errors = metric_value("rlhf_reward_scorer_errors_total", {"scorer": flaky})
        for mode, why in [("raise", "RuntimeError: flaky was asked to fail"),
                          ("short", "returned 1 scores for 2 items"),
                          ("nan", "returned nan for item 0"),
                          ("text", "returned str")]:
            err = await expect_error(ch, [item("a b", mode=mode), item("c")], internal, flaky,
                                     why)
            assert "request id" in err.details()
            resp = await score(ch, [item("a b"), item("c")])  # the next call is fine
            assert by_name(resp.scores[0])[flaky] == 1.0
        assert metric_value("rlhf_reward_scorer_errors_total", {"scorer": flaky}) == errors + 4
        # Concurrent good calls alongside a failing one all get their answer.
        calls = [score(ch, [item("x", mode="raise" if i == 3 else "ok")]) for i in range(8)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [isinstance(r, grpc.aio.AioRpcError) for r in results] == [
            i == 3 for i in range(8)]
    finally:
        await handle.close()


async def test_user_function_arguments_and_async_functions():
    echo = "python:tests.fixtures.reward_helpers:echo_kwargs"
    length = "python:tests.fixtures.reward_helpers:async_length"
    handle = await start_reward([echo, length, "rule:final_number"])
    try:
        resp = await score(handle.channel, [
            item("It is 42.", reference="#### 42", lang="en"),
            item("Maybe 41", messages=[("user", "6 x 7?")], reference="#### 42"),
        ])
        parts = [by_name(s) for s in resp.scores]
        # echo: 1000 * chat + 100 * len(reference) + extra keyword lists (lang)
        assert [p[echo] for p in parts] == [700 + 1, 1000 + 700 + 1]
        assert [p[length] for p in parts] == [9.0, 8.0]
        assert [p["rule:final_number"] for p in parts] == [1.0, 0.0]
        await expect_error(handle.channel, [item("42")], grpc.StatusCode.INVALID_ARGUMENT,
                           "items[0].reference is empty", "rule:final_number")
    finally:
        await handle.close()


async def test_normalisation_standardises_and_freezes():
    words = "python:tests.fixtures.reward_helpers:word_count"
    handle = await start_reward([words, "rule:length?target=3"], normalize="all",
                                normalize_freeze_after=6)
    try:
        texts = ["a", "a b", "a b c", "a b c d", "a b c d e", "a b c d e f"]
        resp = await score(handle.channel, [item(t) for t in texts])
        values = [by_name(s)[words] for s in resp.scores]
        assert statistics.fmean(values) == pytest.approx(0.0, abs=1e-9)
        assert statistics.pstdev(values) == pytest.approx(1.0, rel=1e-9)
        # Frozen after 6 items: the same input gets the same score from now on.
        again = await score(handle.channel, [item("a b c d e f g h")])
        twice = await score(handle.channel, [item("a b c d e f g h")])
        assert again.scores[0].score == twice.scores[0].score
        mean, std = 3.5, statistics.pstdev(range(1, 7))
        assert by_name(again.scores[0])[words] == pytest.approx((8 - mean) / std)
        info = await stub(handle.channel).GetInfo(reward_pb2.RewardServiceGetInfoRequest())
        assert [s.normalized for s in info.scorers] == [True, True]
    finally:
        await handle.close()


async def test_no_scorers_is_failed_precondition():
    handle = await start_reward([])
    try:
        await expect_error(handle.channel, [item("x")], grpc.StatusCode.FAILED_PRECONDITION,
                           "no scorers configured")
    finally:
        await handle.close()


@pytest.mark.parametrize("make_spec,message", [
    (lambda tmp: f"rm:{tmp}/absent", "reward model folder {tmp}/absent does not exist"),
    (lambda tmp: f"rm:{tmp}/empty", "{tmp}/empty has neither config.json"),
    (lambda tmp: f"rm:{tmp}/broken", "cannot load reward model {tmp}/broken"),
    (lambda tmp: f"rm:{tmp}/base", "{tmp}/base lacks trained weights"),
    (lambda tmp: f"rm:{tmp}/adapter", "LoRA adapter over /no/such/base"),
])
async def test_unloadable_reward_models_stop_start_up_naming_the_path(
        tmp_path, tiny_model_dir, make_spec, message):
    import json
    import shutil

    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    shutil.copytree(tiny_model_dir, tmp_path / "base")  # a causal LM: no trained score head
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/no/such/base", "peft_type": "LORA"}))
    with pytest.raises(FailedPrecondition) as err:
        await start_reward([make_spec(tmp_path)])
    assert message.format(tmp=tmp_path) in err.value.message


def test_bad_scorers_fail_the_command_with_a_message(tmp_path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env["RLHF_HOME"] = str(tmp_path)
    for spec, message in [(f"rm:{tmp_path}/nothing", f"{tmp_path}/nothing does not exist"),
                          ("python:no_such_mod_q:f", "cannot import no_such_mod_q"),
                          ("rule:length?target=x", "not an integer")]:
        proc = subprocess.run(
            [sys.executable, "-m", "services.reward", "--port", "0", "--metrics-port", "0",
             "--scorer", spec], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "reward failed to start" in proc.stderr and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


async def test_metrics_count_calls_items_batches_scores_and_errors(reward_server, tiny_rm):
    rm = rm_name(tiny_rm)
    items_before = metric_value("rlhf_reward_items_total")
    ok_before = metric_value("rlhf_reward_score_calls_total", {"result": "ok"})
    invalid_before = metric_value("rlhf_reward_score_calls_total", {"result": "invalid"})
    scores_before = metric_value("rlhf_reward_scorer_score_count", {"scorer": WORDS})
    batched_before = metric_value("rlhf_reward_batch_size_items_sum", {"scorer": rm})
    await score(reward_server.channel, [item("one two"), item("three")])
    with pytest.raises(grpc.aio.AioRpcError):
        await score(reward_server.channel, [])
    assert metric_value("rlhf_reward_items_total") == items_before + 2
    assert metric_value("rlhf_reward_score_calls_total", {"result": "ok"}) == ok_before + 1
    assert metric_value("rlhf_reward_score_calls_total", {"result": "invalid"}) == (
        invalid_before + 1)
    assert metric_value("rlhf_reward_scorer_score_count", {"scorer": WORDS}) == scores_before + 2
    assert metric_value("rlhf_reward_batch_size_items_sum", {"scorer": rm}) == batched_before + 2
    text = reward_server.metrics_text()  # what Prometheus scrapes
    for series in ("rlhf_reward_items_total", "rlhf_reward_score_duration_seconds_bucket",
                   "rlhf_reward_scorer_duration_seconds_bucket",
                   f'rlhf_reward_scorer_score_bucket{{le="1.0",scorer="{WORDS}"}}',
                   "rlhf_reward_batch_size_items_bucket", "rlhf_reward_batch_wait_seconds_bucket",
                   "rlhf_reward_grpc_requests_total"):
        assert series in text, series
    assert REWARD_SCORERS[1] == WORDS
