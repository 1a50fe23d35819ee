"""The feedback store's rules, on a real SQLite file and on a real PostgreSQL server (started by
the tests, tests/fixtures/postgres.py): tenants own their answers, one choice and one rating per
answer, answers stored per tenant per day, retention purge on a clock the test controls, the
export's cursor, and two stores on one database (two gateway replicas) writing at once."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from sqlalchemy import func, select

from gateway.feedback import (
    DAY,
    BadCursor,
    DuplicateAnswer,
    DuplicateFeedback,
    FeedbackStore,
    StoredCandidate,
    StoreSchemaError,
    UnknownAnswer,
    answers,
    counters,
)

A, B = "key:aaaaaaaaaaaaaaaa", "key:bbbbbbbbbbbbbbbb"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a UTC day boundary
TEXTS = ("red apple", "green pear", "blue sky")


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def make_store(store_url):
    """Stores on the test's database (each one = a gateway replica); closed after the test."""
    made: list[FeedbackStore] = []

    def make(clock=None) -> FeedbackStore:
        store = FeedbackStore(store_url, **({"clock": clock} if clock else {}))
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def answer(store: FeedbackStore, rid: str, tenant: str, texts=TEXTS, **kwargs) -> bool:
    return store.record_answer(
        rid, "best-of-n", "policy@v1", f"prompt of {rid}", None,
        [StoredCandidate(i, t, float(i), "stop") for i, t in enumerate(texts)], best_index=0,
        tenant=tenant, **kwargs)


def choose(store: FeedbackStore, rid: str, tenant: str, index: int) -> int:
    return store.record_feedback(rid, index, None, None, None, tenant=tenant)


def rate(store: FeedbackStore, rid: str, tenant: str, rating: int) -> int:
    return store.record_feedback(rid, None, rating, None, None, tenant=tenant)


# ---- tenants and limits -------------------------------------------------------------------------

def test_feedback_is_accepted_from_the_answers_tenant_only_and_once_per_kind(make_store):
    """22.1: an answer belongs to the tenant that asked; feedback from another tenant finds no
    answer (as for an id never stored); one choice and one rating per answer."""
    store = make_store()
    assert answer(store, "r1", A)
    with pytest.raises(UnknownAnswer):
        choose(store, "r1", B, 0)
    choose(store, "r1", A, 1)
    with pytest.raises(DuplicateFeedback, match="already has a choice"):
        choose(store, "r1", A, 2)
    rate(store, "r1", A, 4)
    with pytest.raises(DuplicateFeedback, match="already has a rating"):
        rate(store, "r1", A, 1)
    # Another tenant may use the same request id for its own answer (a 409 there would tell it
    # that A's id exists); A's answer and feedback stay as they were.
    assert answer(store, "r1", B, texts=("one", "two"))
    with pytest.raises(DuplicateAnswer):
        answer(store, "r1", A)
    choose(store, "r1", B, 1)
    pairs = [(p["tenant"], p["chosen"], p["rejected"]) for p in store.export("preference")]
    assert pairs == [(A, "green pear", "red apple"), (A, "green pear", "blue sky"),
                     (B, "two", "one")]
    ratings = [(r["tenant"], r["response"], r["rating"]) for r in store.export("ratings")]
    assert ratings == [(A, "red apple", 4)]  # a rating without an index is about the best


def test_answers_stored_per_tenant_per_day_are_limited(make_store):
    """22.1: past `daily_limit` answers in a UTC day a tenant's answers are not stored (and so
    take no feedback); other tenants and the next day are not affected."""
    clock = Clock(T0 + 10)
    store = make_store(clock)
    assert [answer(store, f"a{i}", A, daily_limit=3) for i in range(4)] == [True] * 3 + [False]
    with pytest.raises(UnknownAnswer):
        choose(store, "a3", A, 0)
    assert answer(store, "b0", B, daily_limit=3)
    clock.now = T0 + DAY + 1
    assert answer(store, "a4", A, daily_limit=3)
    assert answer(store, "a5", A)  # 0 = no limit
    with store.reader.connect() as conn:
        stored = conn.execute(select(func.count()).select_from(answers)
                              .where(answers.c.tenant == A)).scalar_one()
    assert stored == 5


def test_purge_deletes_answers_past_retention_with_their_feedback(make_store):
    """22.1: feedback_retention_days: the purge deletes answers older than the retention and
    their feedback, keeps the rest, and the export's cursor still resumes afterwards."""
    clock = Clock(T0)
    store = make_store(clock)
    for rid in ("old1", "old2", "old3"):
        answer(store, rid, A)
    choose(store, "old1", A, 0)
    rate(store, "old2", A, 5)
    clock.now = T0 + 2 * DAY
    answer(store, "new1", A)
    choose(store, "new1", A, 2)
    before = list(store.export())
    clock.now = T0 + 2 * DAY + 100
    assert store.purge(retention_seconds=DAY, batch=2) == (3, 2)
    assert [p["request_id"] for p in store.export()] == ["new1", "new1"]
    assert list(store.export("ratings")) == []
    with pytest.raises(UnknownAnswer):
        choose(store, "old3", A, 0)
    assert list(store.export(after=before[1]["cursor"])) == before[2:]
    assert store.purge(retention_seconds=DAY) == (0, 0)
    clock.now = T0 + 3 * DAY + 200
    assert store.purge(retention_seconds=DAY) == (1, 1)


# ---- the export ---------------------------------------------------------------------------------

def test_export_cursor_resumes_and_filters_by_tenant_time_and_kind(make_store):
    """22.1: every record carries tenant, created_at and a cursor increasing in export order;
    `after=` resumes exactly after a record (even inside one choice's pairs), `limit` pages,
    and tenant / since / until / kind filter."""
    clock = Clock(T0)
    store = make_store(clock)
    for i in range(8):
        tenant = A if i % 2 == 0 else B
        answer(store, f"r{i}", tenant)
        clock.now = T0 + 10 * i
        choose(store, f"r{i}", tenant, i % 3)
        if i < 3:
            rate(store, f"r{i}", tenant, 1 + i)
    full = list(store.export())
    assert len(full) == 16  # 8 choices x 2 other candidates
    cursors = [r["cursor"] for r in full]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    assert all({"prompt", "chosen", "rejected", "request_id", "tenant", "created_at"} <= set(r)
               for r in full)
    assert list(store.export(page_size=3)) == full

    pulled, cursor = [], None
    while batch := list(store.export(after=cursor, limit=3)):
        pulled += batch
        cursor = batch[-1]["cursor"]
    assert pulled == full
    assert list(store.export(after=full[-1]["cursor"])) == []
    assert list(store.export(after=full[0]["cursor"])) == full[1:]  # inside r0's two pairs

    assert list(store.export(tenant=A)) == [r for r in full if r["tenant"] == A]
    window = list(store.export(since=T0 + 20, until=T0 + 50))
    assert sorted({r["request_id"] for r in window}) == ["r2", "r3", "r4"]
    assert [r["rating"] for r in store.export("ratings")] == [1, 2, 3]
    assert [r["rating"] for r in store.export("ratings", tenant=B)] == [2]
    with pytest.raises(BadCursor):
        list(store.export(after="12; drop table answers"))


# ---- several replicas on one database -----------------------------------------------------------

def _together(workers: list) -> list:
    """Runs the callables in threads released at once; returns their results or exceptions."""
    barrier = threading.Barrier(len(workers))
    results: list = [None] * len(workers)

    def run(i, fn):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_replicas_starting_at_once_create_the_schema_once(store_url):
    """22.7: several gateway replicas starting together on an empty database all come up, with
    one schema and one feedback counter."""
    stores = _together([lambda: FeedbackStore(store_url) for _ in range(4)])
    try:
        assert all(isinstance(s, FeedbackStore) for s in stores), stores
        answer(stores[0], "r", A)
        choose(stores[3], "r", A, 1)
        with stores[1].reader.connect() as conn:
            assert conn.execute(select(func.count()).select_from(counters)).scalar_one() == 1
    finally:
        for s in stores:
            if isinstance(s, FeedbackStore):
                s.close()


def test_two_replicas_share_the_daily_limit_and_the_once_per_answer_rule(make_store):
    """22.7: two stores on one database (two gateway replicas) writing at once: a tenant's
    daily limit holds across both exactly, and of simultaneous choices on one answer exactly
    one is recorded."""
    one, two = make_store(), make_store()
    results = _together([
        (lambda s=s, i=i: [answer(s, f"w{i}-{k}", A, daily_limit=10) for k in range(8)])
        for i, s in enumerate([one, two, one, two])])
    flat = [ok for r in results for ok in (r if isinstance(r, list) else [r])]
    assert all(isinstance(ok, bool) for ok in flat), flat
    assert flat.count(True) == 10

    answer(one, "contested", A)
    outcomes = _together([(lambda s=s, i=i: choose(s, "contested", A, i % 3))
                          for i, s in enumerate([one, two] * 3)])
    assert sum(isinstance(o, int) for o in outcomes) == 1, outcomes
    assert all(isinstance(o, (int, DuplicateFeedback)) for o in outcomes), outcomes
    assert len({r["cursor"] for r in two.export()}) == 2


def test_incremental_pulls_during_writes_from_two_replicas_miss_nothing(make_store):
    """22.1 / 22.7: a puller following the cursor while two replicas record feedback gets every
    record exactly once, in cursor order (sequence numbers are given in commit order)."""
    one, two = make_store(), make_store()
    per_writer = 25
    for w in range(2):
        for k in range(per_writer):
            answer(one, f"p{w}-{k}", A if w == 0 else B)
    done = threading.Event()
    pulled: list[dict] = []

    def writer(store, w):
        for k in range(per_writer):
            choose(store, f"p{w}-{k}", A if w == 0 else B, k % 3)

    def puller():
        cursor = None
        while True:
            finished = done.is_set()
            batch = list(one.export(after=cursor, limit=7))
            pulled.extend(batch)
            if batch:
                cursor = batch[-1]["cursor"]
            elif finished:
                return

    pull = threading.Thread(target=puller)
    pull.start()
    results = _together([lambda: writer(one, 0), lambda: writer(two, 1)])
    done.set()
    pull.join(120)
    assert results == [None, None]
    cursors = [r["cursor"] for r in pulled]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    assert pulled == list(two.export())
    assert len(pulled) == 2 * per_writer * 2


# ---- an older file ------------------------------------------------------------------------------

def test_a_store_of_an_older_layout_is_refused_with_the_way_out(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE answers (request_id VARCHAR(128) PRIMARY KEY, "
                     "created_at FLOAT NOT NULL, endpoint VARCHAR(32) NOT NULL, "
                     "model VARCHAR(256) NOT NULL, prompt TEXT NOT NULL, messages TEXT, "
                     "candidates TEXT NOT NULL, best_index INTEGER NOT NULL)")
    with pytest.raises(StoreSchemaError, match="older layout.*lacks id, tenant.*new database"):
        FeedbackStore(f"sqlite:///{path}")
