"""Dynamic micro-batching: the batcher on its own (grouping, splitting, errors, cancellation,
shutdown), then over gRPC: concurrent calls share forward passes and get the scores they get
one at a time."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from rlhf.plumbing.errors import Unavailable
from services.reward.batcher import MicroBatcher
from services.reward.items import Item
from services.reward.rm import RewardModel
from tests.fixtures.reward_helpers import FILLER, by_name, item, metric_value, score, start_reward


class Recorder:
    """A batch function that doubles its inputs and remembers the batches it saw."""

    def __init__(self, fail_on=None, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.gate = gate

    def __call__(self, xs: list[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(xs))
        if self.fail_on is not None and self.fail_on in xs:
            raise ValueError(f"bad input {self.fail_on}")
        return [2 * x for x in xs]


async def test_concurrent_calls_share_batches_and_get_their_own_results():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=4, max_wait_s=0.5)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
    assert results == [[2 * i] for i in range(10)]
    assert [len(b) for b in fn.batches] == [4, 4, 2]
    assert sorted(x for b in fn.batches for x in b) == list(range(10))
    await batcher.close()


async def test_a_large_call_is_split_and_max_wait_bounds_the_wait():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=3, max_wait_s=0.0)
    assert await batcher.submit(list(range(8))) == [2 * i for i in range(8)]
    assert [len(b) for b in fn.batches] == [3, 3, 2]
    # With no wait, a lone item leaves at once instead of waiting for company.
    assert await asyncio.wait_for(batcher.submit([5]), 5) == [10]
    await batcher.close()


async def test_items_queue_while_the_model_runs():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = MicroBatcher(fn, max_batch_size=8, max_wait_s=0.0)
    first = asyncio.ensure_future(batcher.submit([0]))
    await asyncio.sleep(0.05)  # batch [0] is running (blocked on the gate)
    rest = [asyncio.ensure_future(batcher.submit([i])) for i in range(1, 6)]
    await asyncio.sleep(0.05)
    gate.set()
    assert await first == [0]
    assert [await r for r in rest] == [[2 * i] for i in range(1, 6)]
    assert fn.batches == [[0], [1, 2, 3, 4, 5]]  # the queue became one batch
    await batcher.close()


async def test_callers_answered_by_a_pass_join_the_next_one():
    """Under load the callers of a finished pass send their next items a moment later; the next
    pass waits max_wait after the model became free for them instead of leaving with only the
    items that queued meanwhile (which splits the load into two alternating half-size passes)."""
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = MicroBatcher(fn, max_batch_size=8, max_wait_s=0.2)

    async def caller_that_comes_back():
        await batcher.submit([0])
        return await batcher.submit([10])

    looping = asyncio.ensure_future(caller_that_comes_back())
    await asyncio.sleep(0.3)  # [0] is running, blocked on the gate
    queued = [asyncio.ensure_future(batcher.submit([i])) for i in (1, 2, 3)]
    await asyncio.sleep(0.4)  # longer than max_wait since they arrived
    gate.set()
    assert await looping == [20]
    assert [await q for q in queued] == [[2], [4], [6]]
    assert fn.batches == [[0], [1, 2, 3, 10]]
    await batcher.close()


async def test_a_failing_batch_fails_its_callers_only():
    fn = Recorder(fail_on=3)
    batcher = MicroBatcher(fn, max_batch_size=2, max_wait_s=0.2)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(6)),
                                   return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, ValueError)]
    assert failed == [2, 3]  # 3 shared its batch with 2
    assert [r for r in results if not isinstance(r, Exception)] == [[0], [2], [8], [10]]
    assert await batcher.submit([7]) == [14]
    await batcher.close()


async def test_cancelled_calls_leave_the_queue_and_close_fails_waiters():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    batcher = MicroBatcher(fn, max_batch_size=4, max_wait_s=0.0)
    running = asyncio.ensure_future(batcher.submit([0]))
    await asyncio.sleep(0.05)
    cancelled = asyncio.ensure_future(batcher.submit([1]))
    kept = asyncio.ensure_future(batcher.submit([2]))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    gate.set()
    assert await running == [0] and await kept == [4]
    assert [1] not in fn.batches and all(1 not in b for b in fn.batches)

    gate.clear()
    blocked = asyncio.ensure_future(batcher.submit([3]))
    waiting = asyncio.ensure_future(batcher.submit([4]))
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0.05)
    gate.set()
    await closing
    for fut in (blocked, waiting):
        with pytest.raises(Unavailable):
            await fut
    with pytest.raises(Unavailable):
        await batcher.submit([5])


def _requests(seed: int, n: int):
    rng = random.Random(seed)
    calls = []
    for _ in range(n):
        calls.append([
            item(" ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 4))) + ".",
                 prompt=rng.choice(["Hi.", "Tell me about your long and eventful day, please."]))
            for _ in range(rng.randint(1, 3))
        ])
    return calls


async def test_batched_scores_equal_unbatched_scores(tiny_rm):
    rm = f"rm:{tiny_rm.path}"
    batched = await start_reward([rm], max_batch_size=16, max_wait_ms=200)
    unbatched = await start_reward([rm], max_batch_size=1, max_wait_ms=0)
    try:
        calls = _requests(seed=5, n=24)
        batches_before = metric_value("rlhf_reward_batch_size_items_count", {"scorer": rm})
        items_before = metric_value("rlhf_reward_batch_size_items_sum", {"scorer": rm})
        together = await asyncio.gather(*(score(batched.channel, c) for c in calls))
        batches = metric_value("rlhf_reward_batch_size_items_count", {"scorer": rm}) - (
            batches_before)
        n_items = sum(len(c) for c in calls)
        assert metric_value("rlhf_reward_batch_size_items_sum", {"scorer": rm}) - items_before == (
            n_items)
        assert batches <= n_items / 2  # the calls really were merged: 2+ items per pass on average

        alone = [await score(unbatched.channel, c) for c in calls]
        direct = RewardModel(tiny_rm.path)
        direct.load()
        for call, a, b in zip(calls, together, alone, strict=True):
            for req, sa, sb in zip(call, a.scores, b.scores, strict=True):
                one = direct.score([Item(req.completion, prompt=req.prompt)])[0]
                assert by_name(sa)[rm] == pytest.approx(by_name(sb)[rm], abs=1e-5)
                assert by_name(sb)[rm] == pytest.approx(one, abs=1e-6)
    finally:
        await batched.close()
        await unbatched.close()


def test_token_budget_groups_sort_by_length_and_bound_padding():
    from services.reward.rm_text import token_budget_groups

    lengths = [5, 3, 9, 1, 7, 40]
    groups = token_budget_groups(lengths, 12)
    assert groups == [[3, 1], [0], [4], [2], [5]]  # 40 > budget: a pass of its own
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or max(lengths[i] for i in group) * len(group) <= 12
    assert token_budget_groups([4] * 8, 10**6) == [[0, 1, 2, 3, 4, 5, 6, 7]]


async def test_split_passes_give_the_scores_of_one_pass(tiny_rm):
    items = [Item(" ".join(FILLER[: 1 + i % 5]), prompt="Hi.") for i in range(12)]
    whole = RewardModel(tiny_rm.path, batch_tokens=10**6)
    split = RewardModel(tiny_rm.path, batch_tokens=64)
    whole.load()
    split.load()
    assert split.score(items) == pytest.approx(whole.score(items), abs=1e-5)
