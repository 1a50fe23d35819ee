"""The feedback store: every ranked answer's candidates and scores, and the human preferences
recorded about them. SQLite (WAL, so the exporter never blocks writers) by default; any
SQLAlchemy URL works, e.g. postgresql+psycopg://... for several gateway replicas.

Calls are synchronous; the web layer runs them in a worker thread."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

metadata = MetaData()

answers = Table(
    "answers", metadata,
    Column("request_id", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("model", String(256), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("messages", Text),  # JSON list of {role, content}, when the prompt was a chat
    Column("candidates", Text, nullable=False),  # JSON list of {index, text, score, finish_reason}
    Column("best_index", Integer, nullable=False),
)

feedback = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), ForeignKey("answers.request_id"), nullable=False,
           index=True),
    Column("created_at", Float, nullable=False),
    Column("chosen_index", Integer),
    Column("rating", Integer),
    Column("candidate_index", Integer),
    Column("comment", Text),
)


class UnknownAnswer(LookupError):
    pass


class BadIndex(ValueError):
    pass


class DuplicateAnswer(ValueError):
    pass


@dataclass
class StoredCandidate:
    index: int
    text: str
    score: float | None
    finish_reason: str


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class FeedbackStore:
    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def record_answer(self, request_id: str, endpoint: str, model: str, prompt: str,
                      messages: list[dict] | None, candidates: list[StoredCandidate],
                      best_index: int) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(answers).values(
                    request_id=request_id, created_at=time.time(), endpoint=endpoint,
                    model=model, prompt=prompt,
                    messages=json.dumps(messages) if messages is not None else None,
                    candidates=json.dumps([c.__dict__ for c in candidates]),
                    best_index=best_index))
        except IntegrityError:
            raise DuplicateAnswer(f"request id {request_id!r} was already used") from None

    def record_feedback(self, request_id: str, chosen_index: int | None, rating: int | None,
                        candidate_index: int | None, comment: str | None) -> int:
        with self.engine.begin() as conn:
            row = conn.execute(select(answers.c.candidates, answers.c.best_index)
                               .where(answers.c.request_id == request_id)).first()
            if row is None:
                raise UnknownAnswer(request_id)
            count = len(json.loads(row.candidates))
            index = chosen_index if chosen_index is not None else candidate_index
            if index is not None and index >= count:
                raise BadIndex(f"the answer has {count} candidates (indices 0..{count - 1})")
            if rating is not None and candidate_index is None:
                candidate_index = row.best_index
            result = conn.execute(insert(feedback).values(
                request_id=request_id, created_at=time.time(), chosen_index=chosen_index,
                rating=rating, candidate_index=candidate_index, comment=comment))
            return int(result.inserted_primary_key[0])

    def export(self, kind: str) -> Iterator[dict]:
        """Training records for `rlhf train rm`: `preference` gives {prompt, chosen, rejected},
        one pair per other candidate of each choice; `ratings` gives {prompt, response, rating}.
        Pairs of identical texts teach nothing, and blank texts are refused by the trainer's
        reader: both are left out."""
        query = (select(feedback, answers.c.prompt, answers.c.candidates)
                 .join(answers, feedback.c.request_id == answers.c.request_id)
                 .order_by(feedback.c.id))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        for row in rows:
            texts = [c["text"] for c in json.loads(row.candidates)]
            if kind == "preference" and row.chosen_index is not None:
                chosen = texts[row.chosen_index]
                for i, other in enumerate(texts):
                    if i != row.chosen_index and other != chosen and other.strip() \
                            and chosen.strip():
                        yield {"prompt": row.prompt, "chosen": chosen, "rejected": other,
                               "request_id": row.request_id}
            elif (kind == "ratings" and row.rating is not None
                  and texts[row.candidate_index].strip()):
                yield {"prompt": row.prompt, "response": texts[row.candidate_index],
                       "rating": row.rating, "request_id": row.request_id}
