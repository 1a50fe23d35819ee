"""The feedback store: every ranked answer's candidates and scores, the tenant (API key id) that
asked, and the human preferences that tenant recorded about it. SQLite (WAL, so the exporter
never blocks writers) by default; PostgreSQL (postgresql+psycopg://...) for several gateway
replicas on one database. Both are tested.

Rules the store enforces itself, so they hold across replicas:
- an answer is found by (tenant, request id): another tenant's answer does not exist for you;
- one choice and one rating per answer (a unique constraint; a second one is refused);
- at most `daily_limit` answers stored per tenant per UTC day (a counter row bumped in the same
  transaction as the insert);
- feedback gets `seq` from a counter row in its inserting transaction: the row lock orders the
  transactions, so `seq` order is commit order and an export cursor never skips a row that
  commits late.

Calls are synchronous; the web layer runs them in a worker thread."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex, CreateTable

metadata = MetaData()

answers = Table(
    "answers", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(80), nullable=False),  # "key:<16 hex>" or "ip:<address>"
    Column("request_id", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("model", String(256), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("messages", Text),  # JSON list of {role, content}, when the prompt was a chat
    Column("candidates", Text, nullable=False),  # JSON list of {index, text, score, finish_reason}
    Column("best_index", Integer, nullable=False),
    UniqueConstraint("tenant", "request_id", name="uq_answers_tenant_request"),
    Index("ix_answers_created_at", "created_at"),
)

feedback = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("seq", BigInteger, nullable=False),
    Column("answer_id", Integer, ForeignKey("answers.id"), nullable=False),
    Column("tenant", String(80), nullable=False),
    Column("kind", String(16), nullable=False),  # "preference" or "rating"
    Column("created_at", Float, nullable=False),
    Column("chosen_index", Integer),
    Column("rating", Integer),
    Column("candidate_index", Integer),
    Column("comment", Text),
    UniqueConstraint("answer_id", "kind", name="uq_feedback_answer_kind"),
    Index("ix_feedback_seq", "seq", unique=True),
    Index("ix_feedback_tenant_seq", "tenant", "seq"),
)

counters = Table(
    "counters", metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

tenant_days = Table(
    "tenant_days", metadata,
    Column("tenant", String(80), primary_key=True),
    Column("day", Integer, primary_key=True),  # UTC days since the epoch
    Column("answers", Integer, nullable=False),
)

KINDS = {"preference": "preference", "ratings": "rating"}  # export name -> stored kind
_SEQ = "feedback_seq"
_SCHEMA_LOCK = 0x726C6866  # PostgreSQL advisory lock id held while creating the schema
_CURSOR = re.compile(r"^(\d{1,18})-(\d{1,4})$")
DAY = 86400.0


class UnknownAnswer(LookupError):
    pass


class BadIndex(ValueError):
    pass


class DuplicateAnswer(ValueError):
    pass


class DuplicateFeedback(ValueError):
    pass


class BadCursor(ValueError):
    pass


class StoreSchemaError(RuntimeError):
    pass


@dataclass
class StoredCandidate:
    index: int
    text: str
    score: float | None
    finish_reason: str


def make_cursor(seq: int, sub: int) -> str:
    # Fixed width, so comparing two cursors as strings agrees with export order.
    return f"{seq:012d}-{sub:04d}"


def parse_cursor(cursor: str) -> tuple[int, int]:
    match = _CURSOR.match(cursor)
    if match is None:
        raise BadCursor(f"not a cursor of this export: {cursor[:40]!r}")
    return int(match.group(1)), int(match.group(2))


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    """SQLite with WAL. Writers open their transaction with BEGIN IMMEDIATE: a deferred one that
    reads first and writes later fails at once (SQLITE_BUSY, no wait) when another process wrote
    in between; IMMEDIATE waits (busy_timeout) for the write lock instead."""
    engine = create_engine(url, pool_pre_ping=True)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000",
                       "foreign_keys=ON"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class FeedbackStore:
    def __init__(self, url: str, clock: Callable[[], float] = time.time):
        self.url = url
        self.clock = clock
        if url.startswith("sqlite"):
            self.engine = _sqlite_engine(url, immediate=True)
            self.reader = _sqlite_engine(url, immediate=False)
        else:
            self.engine = self.reader = create_engine(url, pool_pre_ping=True)
        self._create_schema()

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()

    def _create_schema(self) -> None:
        """Idempotent and safe when several replicas start at once: IF NOT EXISTS everywhere,
        one transaction, and on PostgreSQL an advisory lock (concurrent CREATE TABLE IF NOT
        EXISTS can still collide in its catalogue)."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
            for table in metadata.sorted_tables:
                conn.execute(CreateTable(table, if_not_exists=True))
            _check_columns(conn, self.url)
            for table in metadata.sorted_tables:
                for index in table.indexes:
                    conn.execute(CreateIndex(index, if_not_exists=True))
            if conn.execute(select(counters.c.value).where(counters.c.name == _SEQ)).first() \
                    is None:
                conn.execute(insert(counters).values(name=_SEQ, value=0))

    # ---- writes -------------------------------------------------------------------------------

    def record_answer(self, request_id: str, endpoint: str, model: str, prompt: str,
                      messages: list[dict] | None, candidates: list[StoredCandidate],
                      best_index: int, *, tenant: str, daily_limit: int = 0) -> bool:
        """Stores the answer for `tenant`; False (nothing stored) when the tenant already stored
        `daily_limit` answers this UTC day (0 = no limit)."""
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                if daily_limit and not _count_answer(conn, tenant, int(now // DAY), daily_limit):
                    return False
                conn.execute(insert(answers).values(
                    tenant=tenant, request_id=request_id, created_at=now, endpoint=endpoint,
                    model=model, prompt=prompt,
                    messages=json.dumps(messages) if messages is not None else None,
                    candidates=json.dumps([c.__dict__ for c in candidates]),
                    best_index=best_index))
        except IntegrityError:
            raise DuplicateAnswer(f"request id {request_id!r} was already used") from None
        return True

    def record_feedback(self, request_id: str, chosen_index: int | None, rating: int | None,
                        candidate_index: int | None, comment: str | None, *,
                        tenant: str) -> int:
        """Records a choice (`chosen_index`) or a rating on the tenant's own answer; returns the
        feedback id. UnknownAnswer for an answer that is not the tenant's (or none at all),
        DuplicateFeedback for a second one of the same kind."""
        kind = "preference" if chosen_index is not None else "rating"
        try:
            with self.engine.begin() as conn:
                row = conn.execute(
                    select(answers.c.id, answers.c.candidates, answers.c.best_index)
                    .where(answers.c.tenant == tenant, answers.c.request_id == request_id)
                ).first()
                if row is None:
                    raise UnknownAnswer(request_id)
                count = len(json.loads(row.candidates))
                index = chosen_index if chosen_index is not None else candidate_index
                if index is not None and index >= count:
                    raise BadIndex(f"the answer has {count} candidates (indices 0..{count - 1})")
                if rating is not None and candidate_index is None:
                    candidate_index = row.best_index
                if conn.execute(select(feedback.c.id).where(
                        feedback.c.answer_id == row.id, feedback.c.kind == kind)).first():
                    raise DuplicateFeedback(_duplicate_message(kind, request_id))
                seq = conn.execute(
                    update(counters).where(counters.c.name == _SEQ)
                    .values(value=counters.c.value + 1).returning(counters.c.value)).scalar_one()
                result = conn.execute(insert(feedback).values(
                    seq=seq, answer_id=row.id, tenant=tenant, kind=kind,
                    created_at=self.clock(), chosen_index=chosen_index, rating=rating,
                    candidate_index=candidate_index, comment=comment))
                return int(result.inserted_primary_key[0])
        except IntegrityError:
            # Another replica recorded the same kind on this answer between our check and insert,
            # or a purge deleted the answer meanwhile.
            with self.reader.connect() as conn:
                still = conn.execute(select(answers.c.id).where(
                    answers.c.tenant == tenant, answers.c.request_id == request_id)).first()
            if still is None:
                raise UnknownAnswer(request_id) from None
            raise DuplicateFeedback(_duplicate_message(kind, request_id)) from None

    def purge(self, retention_seconds: float, batch: int = 1000) -> tuple[int, int]:
        """Deletes answers older than the retention, with their feedback, in batches (short
        transactions: writers are never held up for long). Returns (answers, feedback) deleted."""
        now = self.clock()
        cutoff = now - retention_seconds
        gone_answers = gone_feedback = 0
        while True:
            with self.engine.begin() as conn:
                ids = list(conn.execute(select(answers.c.id).where(answers.c.created_at < cutoff)
                                        .order_by(answers.c.id).limit(batch)).scalars())
                if not ids:
                    break
                gone_feedback += conn.execute(
                    delete(feedback).where(feedback.c.answer_id.in_(ids))).rowcount
                gone_answers += conn.execute(delete(answers).where(answers.c.id.in_(ids))).rowcount
        with self.engine.begin() as conn:
            # Day counters only matter for the current UTC day.
            conn.execute(delete(tenant_days).where(tenant_days.c.day < int(now // DAY) - 1))
        return gone_answers, gone_feedback

    # ---- reads --------------------------------------------------------------------------------

    def export_pages(self, kind: str = "preference", *, tenant: str | None = None,
                     since: float | None = None, until: float | None = None,
                     after: str | None = None, limit: int | None = None,
                     page_size: int = 500) -> Iterator[list[dict]]:
        """Training records for `rlhf train rm`, in pages. `preference` gives {prompt, chosen,
        rejected}, one pair per other candidate of each choice; `ratings` gives {prompt,
        response, rating}. Every record also has request_id, tenant, created_at (of the
        feedback, unix seconds) and cursor (increasing; `after=` a record's cursor gives the
        records after it). Pairs of identical texts teach nothing, and blank texts are refused
        by the trainer's reader: both are left out.

        Keyset pagination: each page is one short query (`seq > last`, LIMIT page_size) on its
        own connection, so memory stays bounded whatever the table holds."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}")
        lo_seq, skip_to = (parse_cursor(after) if after is not None else (0, -1))
        left = limit
        while left is None or left > 0:
            query = (select(feedback.c.seq, feedback.c.tenant, feedback.c.created_at,
                            feedback.c.chosen_index, feedback.c.rating,
                            feedback.c.candidate_index, answers.c.request_id, answers.c.prompt,
                            answers.c.candidates)
                     .join(answers, feedback.c.answer_id == answers.c.id)
                     .where(feedback.c.kind == KINDS[kind], feedback.c.seq >= lo_seq)
                     .order_by(feedback.c.seq).limit(page_size))
            if tenant is not None:
                query = query.where(feedback.c.tenant == tenant)
            if since is not None:
                query = query.where(feedback.c.created_at >= since)
            if until is not None:
                query = query.where(feedback.c.created_at < until)
            with self.reader.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            page = []
            for row in rows:
                for sub, record in _records(kind, row):
                    if row.seq == lo_seq and sub <= skip_to:
                        continue  # at or before the `after` cursor
                    record.update(request_id=row.request_id, tenant=row.tenant,
                                  created_at=row.created_at, cursor=make_cursor(row.seq, sub))
                    page.append(record)
            if left is not None:
                page = page[:left]
                left -= len(page)
            if page:
                yield page
            lo_seq, skip_to = rows[-1].seq + 1, -1
            if len(rows) < page_size:
                return

    def export(self, kind: str = "preference", **filters) -> Iterator[dict]:
        for page in self.export_pages(kind, **filters):
            yield from page


def _records(kind: str, row) -> Iterator[tuple[int, dict]]:
    """(sub-position, record) of one feedback row; the sub-position is stable across exports
    (a candidate index), so a cursor inside a row's pairs stays valid."""
    texts = [c["text"] for c in json.loads(row.candidates)]
    if kind == "preference":
        chosen = texts[row.chosen_index]
        if not chosen.strip():
            return
        for i, other in enumerate(texts):
            if i != row.chosen_index and other != chosen and other.strip():
                yield i, {"prompt": row.prompt, "chosen": chosen, "rejected": other}
    elif texts[row.candidate_index].strip():
        yield 0, {"prompt": row.prompt, "response": texts[row.candidate_index],
                  "rating": row.rating}


def _count_answer(conn: Connection, tenant: str, day: int, limit: int) -> bool:
    """Counts one more stored answer for the tenant's day unless it reached `limit`. The
    conditional UPDATE is atomic on both databases; the first answer of a day inserts the row,
    and a replica that loses that race bumps the row the other one inserted."""
    of_day = (tenant_days.c.tenant == tenant) & (tenant_days.c.day == day)
    bump = (update(tenant_days).where(of_day, tenant_days.c.answers < limit)
            .values(answers=tenant_days.c.answers + 1))
    if conn.execute(bump).rowcount:
        return True
    if conn.execute(select(tenant_days.c.answers).where(of_day)).first() is not None:
        return False
    try:
        with conn.begin_nested():
            conn.execute(insert(tenant_days).values(tenant=tenant, day=day, answers=1))
        return True
    except IntegrityError:
        return bool(conn.execute(bump).rowcount)


def _duplicate_message(kind: str, request_id: str) -> str:
    what = "a choice" if kind == "preference" else "a rating"
    return f"answer {request_id!r} already has {what}; feedback is recorded once per answer"


def _check_columns(conn: Connection, url: str) -> None:
    """CREATE TABLE IF NOT EXISTS leaves a table of an older layout as it is: refuse it with the
    way out instead of failing later on a missing column."""
    inspector = inspect(conn)
    for table in (answers, feedback):
        have = {c["name"] for c in inspector.get_columns(table.name)}
        missing = sorted({c.name for c in table.columns} - have)
        if missing:
            raise StoreSchemaError(
                f"the feedback store at {_safe_url(url)} has an older layout (table "
                f"{table.name!r} lacks {', '.join(missing)}); export what you need from it with "
                "the gateway version that wrote it and point feedback_db at a new database")


def _safe_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)
