"""Reading the trainer's JSONL data (DESIGN.md decision 9): PPO prompts and SFT examples.

One JSON object per line; blank lines are allowed. Nothing is skipped silently: every bad line is
reported as `file:line: reason`, all of them are collected, and one `DataError` lists them (the
first MAX_LISTED_ERRORS in its message, all in `.errors`).

    PPO prompts   {"prompt": str}  or  {"messages": [{"role", "content"}, ...]}  (not ending
                  with an assistant turn: the policy writes that one)
    SFT examples  {"prompt": str, "response": str}  or  {"text": str}  or
                  {"messages": [...]} whose last turn is the assistant's (the one trained on)

Other keys on a line are allowed and ignored by SFT; a prompt keeps them in `meta` (a reward
function may want a reference answer, say).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Enough to see the pattern of a broken file without flooding a terminal.
MAX_LISTED_ERRORS = 20

Message = dict[str, str]
# The roles the policy service accepts in a chat prompt; anything else fails there, later.
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad data file: `.errors` holds every problem as `file:line: reason` (or `file: reason`)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        shown = self.errors[:MAX_LISTED_ERRORS]
        if len(self.errors) == 1:
            message = self.errors[0]
        else:
            message = f"{len(self.errors)} problems in the data:\n" + "\n".join(
                f"  {e}" for e in shown
            )
            if len(self.errors) > len(shown):
                message += f"\n  ... and {len(self.errors) - len(shown)} more"
        super().__init__(message)


@dataclass(frozen=True)
class PromptRecord:
    """One PPO prompt: plain text or chat messages (exactly one of the two is set)."""

    source: str  # "file:line", for messages about this record later on
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the line's other keys


@dataclass(frozen=True)
class SFTRecord:
    """One SFT example in one of three forms (see `kind`); the other fields are None.

    prompt/response: loss on the response only. text: loss on every token. messages: loss on the
    final (assistant) turn only; the turns before it are the prompt.
    """

    source: str  # "file:line"
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    messages: tuple[Message, ...] | None = None

    @property
    def kind(self) -> str:
        if self.text is not None:
            return "text"
        if self.messages is not None:
            return "messages"
        return "prompt_response"


class _BadLine(Exception):
    """The reason one line is wrong; the reader adds `file:line: ` in front."""


def iter_jsonl(path: str | Path, errors: list[str] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line_no, obj) for each JSON object in the file; line numbers start at 1.

    Blank lines are skipped. Lines that are not UTF-8, not JSON, or not a JSON object are
    reported as `file:line: reason`: appended to `errors` when a list is given (and iteration
    goes on), else collected and raised as one DataError after the last line. A missing or
    unreadable file raises DataError at once.
    """
    own_errors = errors is None
    errors = [] if errors is None else errors
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    with fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                errors.append(f"{where}: not UTF-8 text (byte {exc.start + 1})")
                continue
            if line_no == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: not JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{where}: expected a JSON object, got {_json_type(obj)}")
                continue
            yield line_no, obj
    if own_errors and errors:
        raise DataError(errors)


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """All prompts of a PPO prompt file, or DataError listing every bad line."""
    return _read(path, _prompt_record)


def read_sft(path: str | Path) -> list[SFTRecord]:
    """All examples of an SFT file, or DataError listing every bad line."""
    return _read(path, _sft_record)


def _read(path, parse) -> list:
    errors: list[str] = []
    records = []
    for line_no, obj in iter_jsonl(path, errors):
        where = f"{path}:{line_no}"
        try:
            records.append(parse(obj, where))
        except _BadLine as exc:
            errors.append(f"{where}: {exc}")
    if errors:
        raise DataError(errors)
    if not records:
        raise DataError([f"{path}: no records (the file is empty)"])
    return records


def _prompt_record(obj: dict, where: str) -> PromptRecord:
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        raise _BadLine('give "prompt" or "messages", not both')
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    if has_prompt:
        return PromptRecord(source=where, prompt=_string(obj, "prompt"), meta=meta)
    if has_messages:
        messages = _messages(obj["messages"])
        if messages[-1]["role"] == "assistant":
            raise _BadLine('"messages" ends with an assistant turn; a prompt ends before the '
                           "turn the policy writes")
        return PromptRecord(source=where, messages=messages, meta=meta)
    raise _BadLine(f'needs "prompt" (a string) or "messages" (an array){_found(obj)}')


def _sft_record(obj: dict, where: str) -> SFTRecord:
    forms = [name for name, keys in (("prompt/response", ("prompt", "response")),
                                     ("text", ("text",)), ("messages", ("messages",)))
             if any(k in obj for k in keys)]
    if len(forms) > 1:
        raise _BadLine(f'give one of "prompt"+"response", "text" or "messages", not several '
                       f"(found {' and '.join(forms)})")
    if not forms:
        raise _BadLine(
            f'needs "prompt" and "response", or "text", or "messages"{_found(obj)}'
        )
    if forms == ["text"]:
        return SFTRecord(source=where, text=_string(obj, "text"))
    if forms == ["messages"]:
        messages = _messages(obj["messages"])
        if messages[-1]["role"] != "assistant":
            raise _BadLine('"messages" must end with the assistant turn to train on (the last '
                           f'role is "{messages[-1]["role"]}")')
        if len(messages) < 2:
            raise _BadLine('"messages" needs at least one turn before the assistant\'s')
        return SFTRecord(source=where, messages=messages)
    for key, other in (("prompt", "response"), ("response", "prompt")):
        if key in obj and other not in obj:
            raise _BadLine(f'has "{key}" but no "{other}"')
    return SFTRecord(source=where, prompt=_string(obj, "prompt"),
                     response=_string(obj, "response"))


def _string(obj: dict, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _BadLine(f'"{key}" must be a string, got {_json_type(value)}')
    if not value.strip():
        raise _BadLine(f'"{key}" is empty')
    return value


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise _BadLine(f'"messages" must be an array, got {_json_type(value)}')
    if not value:
        raise _BadLine('"messages" is empty')
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _BadLine(f'"messages"[{i}] must be an object, got {_json_type(msg)}')
        for key in ("role", "content"):
            if key not in msg:
                raise _BadLine(f'"messages"[{i}] has no "{key}"')
            if not isinstance(msg[key], str):
                raise _BadLine(f'"messages"[{i}].{key} must be a string, got '
                               f"{_json_type(msg[key])}")
            if not msg[key].strip():
                raise _BadLine(f'"messages"[{i}].{key} is empty')
        if msg["role"] not in ROLES:
            raise _BadLine(f'"messages"[{i}].role is "{msg["role"]}"; use one of '
                           + ", ".join(ROLES))
        out.append(dict(msg))
    return tuple(out)


def _found(obj: dict) -> str:
    if not obj:
        return " (the object is empty)"
    return " (found " + ", ".join(f'"{k}"' for k in list(obj)[:8]) + ")"


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


__all__ = [
    "DataError",
    "MAX_LISTED_ERRORS",
    "PromptRecord",
    "SFTRecord",
    "iter_jsonl",
    "read_prompts",
    "read_sft",
]
