"""Human feedback on stored answers, and its export as `rlhf train rm` JSONL."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from gateway.errors import APIError
from gateway.feedback import BadIndex, UnknownAnswer
from gateway.schemas import FeedbackRequest, FeedbackResponse
from gateway.state import Caller, State

router = APIRouter()


@router.post("/v1/feedback", response_model=FeedbackResponse, status_code=201,
             summary="Record which candidate was better, or a 1-5 rating")
async def post_feedback(body: FeedbackRequest, state: State, caller: Caller) -> FeedbackResponse:
    try:
        fid = await state.store_call(state.store.record_feedback, body.request_id,
                                     body.chosen_index, body.rating, body.candidate_index,
                                     body.comment)
    except UnknownAnswer:
        raise APIError(404, f"no answer with request id {body.request_id!r}",
                       "unknown_request_id", "request_id") from None
    except BadIndex as exc:
        param = "chosen_index" if body.chosen_index is not None else "candidate_index"
        raise APIError(400, str(exc), "invalid_request", param) from None
    kind = "preference" if body.chosen_index is not None else "rating"
    state.metrics.feedback.labels(kind).inc()
    return FeedbackResponse(id=fid, request_id=body.request_id, kind=kind)


@router.get("/v1/feedback/export", summary="Feedback as JSONL for `rlhf train rm`",
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "One JSON object per line"}})
async def export_feedback(state: State, caller: Caller,
                          kind: Literal["preference", "ratings"] = Query(
                              "preference", description="preference pairs or 1-5 ratings")):
    rows = await state.store_call(lambda: list(state.store.export(kind)))
    body = "".join(json.dumps(r) + "\n" for r in rows)
    disposition = f'attachment; filename="{kind}.jsonl"'
    return StreamingResponse(iter([body]), media_type="application/x-ndjson",
                             headers={"Content-Disposition": disposition})
