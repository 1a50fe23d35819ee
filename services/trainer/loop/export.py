"""New preference pairs from the gateway: `GET /v1/feedback/export?kind=preference&after=CURSOR`
with an admin key, page by page, rows {prompt, chosen, rejected, request_id, cursor, ...}."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx


class LoopError(Exception):
    """A round could not run (a peer unreachable or refusing, bad data); the message says why."""


@dataclass(frozen=True)
class FeedbackPair:
    prompt: str
    chosen: str
    rejected: str
    request_id: str
    cursor: str

    def row(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
                "request_id": self.request_id}


def pull_pairs(url: str, admin_key: str | None, after: str | None, *, page_size: int,
               max_pairs: int, timeout: float) -> list[FeedbackPair]:
    """Every pair newer than `after` (oldest first), at most `max_pairs`."""
    pairs: list[FeedbackPair] = []
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        while len(pairs) < max_pairs:
            limit = min(page_size, max_pairs - len(pairs))
            page = _page(client, url, after, limit)
            pairs.extend(page)
            if len(page) < limit:
                break
            after = page[-1].cursor
    return pairs


def _page(client: httpx.Client, url: str, after: str | None, limit: int) -> list[FeedbackPair]:
    params = {"kind": "preference", "limit": str(limit)}
    if after:
        params["after"] = after
    try:
        response = client.get("/v1/feedback/export", params=params)
    except httpx.TransportError as exc:
        raise LoopError(f"gateway at {url} is unreachable: {exc!r}") from None
    if response.status_code in (401, 403):
        raise LoopError(f"gateway at {url} refused the export (HTTP {response.status_code}: "
                        f"{_message(response)}); it needs one of the gateway's admin_api_keys")
    if response.status_code != 200:
        raise LoopError(f"gateway at {url} answered the export with HTTP "
                        f"{response.status_code}: {_message(response)}")
    pairs = []
    for number, line in enumerate(response.text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append(FeedbackPair(*(_text(row, k) for k in (
                "prompt", "chosen", "rejected", "request_id", "cursor"))))
        except (ValueError, TypeError) as exc:
            raise LoopError(f"gateway at {url}: export line {number} is not a preference row "
                            f"({exc})") from None
    return pairs


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and key == "cursor":
        return str(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{key}` must be a non-empty string")
    return value


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message") or response.text[:200])
    except (ValueError, AttributeError):
        return response.text[:200]
