"""Human feedback on stored answers, and its export as `rlhf train rm` JSONL.

Feedback belongs to the tenant (API key id) whose request produced the answer: another tenant's
answer is answered 404 exactly like an id that was never stored, so request ids (which clients
may choose, via X-Request-ID) cannot be probed. Each answer takes one choice and one rating; a
second one is a 409 and changes nothing, so records the reward-model loop already pulled stay
true. The export needs an admin key (admin_api_keys) and streams page by page."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from gateway.errors import APIError
from gateway.feedback import BadCursor, BadIndex, DuplicateFeedback, UnknownAnswer, parse_cursor
from gateway.guard import tenant_label
from gateway.schemas import FeedbackRequest, FeedbackResponse
from gateway.state import Caller, State

log = logging.getLogger("rlhf.gateway")

router = APIRouter()


@router.post("/v1/feedback", response_model=FeedbackResponse, status_code=201,
             summary="Record which candidate was better, or a 1-5 rating (once each per answer)")
async def post_feedback(body: FeedbackRequest, state: State, caller: Caller) -> FeedbackResponse:
    try:
        fid = await state.store_call(state.store.record_feedback, body.request_id,
                                     body.chosen_index, body.rating, body.candidate_index,
                                     body.comment, tenant=caller)
    except UnknownAnswer:
        raise APIError(404, f"no answer with request id {body.request_id!r}",
                       "unknown_request_id", "request_id") from None
    except BadIndex as exc:
        param = "chosen_index" if body.chosen_index is not None else "candidate_index"
        raise APIError(400, str(exc), "invalid_request", param) from None
    except DuplicateFeedback as exc:
        raise APIError(409, str(exc), "feedback_exists", "request_id") from None
    kind = "preference" if body.chosen_index is not None else "rating"
    state.metrics.feedback.labels(kind, tenant_label(caller)).inc()
    return FeedbackResponse(id=fid, request_id=body.request_id, kind=kind)


def parse_time(value: str | None, param: str) -> float | None:
    """Unix seconds ("1767225600", "1767225600.5") or ISO 8601 ("2026-01-01T00:00:00Z"; no zone
    means UTC)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise APIError(400, f"{param} must be unix seconds or an ISO 8601 time, not "
                                f"{value[:40]!r}", "invalid_request", param) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(seconds):
        raise APIError(400, f"{param} must be a finite number of seconds", "invalid_request",
                       param)
    return seconds


async def _ndjson(first: list[dict], pages: Iterator[list[dict]]) -> AsyncIterator[bytes]:
    page: list[dict] | None = first
    while page is not None:
        yield "".join(json.dumps(r) + "\n" for r in page).encode()
        try:
            page = await asyncio.to_thread(next, pages, None)
        except Exception:  # noqa: BLE001 - the body has started; end it (the cursor resumes)
            log.exception("feedback export failed mid-stream")
            return


@router.get("/v1/feedback/export", summary="Feedback as JSONL for `rlhf train rm` (admin key)",
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "One JSON object per line, each with a `cursor`"}})
async def export_feedback(
        state: State, caller: Caller,
        kind: Literal["preference", "ratings"] = Query(
            "preference", description="preference pairs or 1-5 ratings"),
        tenant: str | None = Query(None, max_length=80,
                                   description="Only this tenant's (`key:<16 hex>`)."),
        since: str | None = Query(None, max_length=40, description=(
            "Feedback given at or after this time (unix seconds or ISO 8601).")),
        until: str | None = Query(None, max_length=40, description=(
            "Feedback given before this time (unix seconds or ISO 8601).")),
        after: str | None = Query(None, max_length=40, description=(
            "Only records after this cursor (the `cursor` of the last record pulled).")),
        limit: int | None = Query(None, ge=1, le=10_000_000, description="Most records.")):
    if not state.is_admin(caller):
        raise APIError(403, "exporting feedback needs an admin key (admin_api_keys)",
                       "admin_key_required")
    if after is not None:
        try:
            parse_cursor(after)
        except BadCursor as exc:
            raise APIError(400, str(exc), "invalid_request", "after") from None
    pages = state.store.export_pages(kind, tenant=tenant, since=parse_time(since, "since"),
                                     until=parse_time(until, "until"), after=after, limit=limit)
    # The first page is read before the response starts: a database failure is still an error
    # status, not a truncated 200.
    first = await asyncio.to_thread(next, pages, None)
    disposition = f'attachment; filename="{kind}.jsonl"'
    return StreamingResponse(_ndjson(first or [], pages), media_type="application/x-ndjson",
                             headers={"Content-Disposition": disposition})
