"""Reading the trainer's JSONL data (DESIGN.md decision 9), for every stage.

One JSON object per line; blank lines are allowed. Nothing is skipped silently: every bad line is
reported as `file:line: reason`, all of them are collected, and one `DataError` lists them (the
first MAX_LISTED_ERRORS in its message, all in `.errors`). A reader given an `errors` list
appends to it instead and returns the good records (`rlhf train rm --skip-bad-lines`).

    PPO prompts   {"prompt": str}  or  {"messages": [{"role", "content"}, ...]}  (not ending
                  with an assistant turn: the policy writes that one)
    SFT examples  {"prompt": str, "response": str}  or  {"text": str}  or
                  {"messages": [...]} whose last turn is the assistant's (the one trained on)
    RM examples   preferences {"prompt" | "instruction", "chosen", "rejected"}  or
                  ratings {"prompt" | "instruction", "response", "rating"}; one kind per file

Other keys on a line are allowed and ignored by SFT and RM; a prompt keeps them in `meta` (a
reward function may want a reference answer, say).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.formats import ROLES
from services.trainer.errors import MAX_LISTED_ERRORS, DataError

Message = dict[str, str]


@dataclass(frozen=True)
class PromptRecord:
    """One PPO prompt: plain text or chat messages (exactly one of the two is set)."""

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


@dataclass(frozen=True)
class Pair:
    """One preference: `chosen` is the better answer to `prompt`."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Rated:
    """One rated answer (any real scale; `rlhf train rm` bins it)."""

    prompt: str
    response: str
    rating: float


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


def read_rm(path: str | Path, errors: list[str] | None = None) -> list[Pair] | list[Rated]:
    """All examples of a reward-model file: preference pairs or ratings, one kind per file (the
    first good line decides). DataError lists every bad line, unless `errors` collects them."""
    kinds: list[type] = []  # the file's kind, once a line has set it

    def parse(obj: dict, where: str) -> Pair | Rated:
        record = _rm_record(obj)
        if not kinds:
            kinds.append(type(record))
        elif type(record) is not kinds[0]:
            raise _BadLine(f"a {_rm_kind(type(record))} line in a file of "
                           f"{_rm_kind(kinds[0])} lines")
        return record

    return _read(path, parse, errors)


def _read(path, parse: Callable[[dict, str], Any], errors: list[str] | None = None) -> list:
    collect = errors is not None
    errors = [] if errors is None else errors
    records = []
    for line_no, obj in iter_jsonl(path, errors):
        where = f"{path}:{line_no}"
        try:
            records.append(parse(obj, where))
        except _BadLine as exc:
            errors.append(f"{where}: {exc}")
    if errors and not collect:
        raise DataError(errors)
    if not records and not errors:
        raise DataError([f"{path}: no records (the file is empty)"])
    return records


def _prompt_record(obj: dict, where: str) -> PromptRecord:
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        raise _BadLine('give "prompt" or "messages", not both')
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    if has_prompt:
        return PromptRecord(prompt=_string(obj, "prompt"), meta=meta)
    if has_messages:
        messages = _messages(obj["messages"])
        if messages[-1]["role"] == "assistant":
            raise _BadLine('"messages" ends with an assistant turn; a prompt ends before the '
                           "turn the policy writes")
        return PromptRecord(messages=messages, meta=meta)
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


def _rm_record(obj: dict) -> Pair | Rated:
    if "chosen" in obj or "rejected" in obj:
        pair = Pair(_rm_prompt(obj), _required(obj, "chosen"), _required(obj, "rejected"))
        if pair.chosen == pair.rejected:
            raise _BadLine('"chosen" and "rejected" are the same text: no preference to learn')
        return pair
    if "rating" in obj:
        rating = obj["rating"]
        if isinstance(rating, bool) or not isinstance(rating, int | float):
            raise _BadLine(f'"rating" must be a number, got {_json_type(rating)}')
        if not math.isfinite(rating):
            raise _BadLine('"rating" is not finite')
        return Rated(_rm_prompt(obj), _required(obj, "response"), float(rating))
    raise _BadLine("neither a preference line (prompt, chosen, rejected) nor a rating line "
                   f"(prompt, response, rating){_found(obj)}")


def _rm_prompt(obj: dict) -> str:
    """The prompt under "prompt" or "instruction"; it may be empty (an answer on its own)."""
    if "prompt" in obj and "instruction" in obj:
        raise _BadLine('has both "prompt" and "instruction"; keep one')
    key = "prompt" if "prompt" in obj else "instruction"
    if key not in obj:
        raise _BadLine('has no "prompt" (or "instruction")')
    if not isinstance(obj[key], str):
        raise _BadLine(f'"{key}" must be a string, got {_json_type(obj[key])}')
    return obj[key]


def _rm_kind(kind: type) -> str:
    return "preference" if kind is Pair else "rating"


def _required(obj: dict, key: str) -> str:
    if key not in obj:
        raise _BadLine(f'has no "{key}"')
    return _string(obj, key)


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


def write_jsonl(path: Path, rows) -> None:
    """Rows (dataclasses or dicts) as a JSONL file, written atomically."""
    from dataclasses import asdict

    from rlhf.files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(
        json.dumps(row if isinstance(row, dict) else asdict(row), ensure_ascii=False) + "\n"
        for row in rows))


__all__ = [
    "DataError",
    "MAX_LISTED_ERRORS",
    "Pair",
    "PromptRecord",
    "Rated",
    "SFTRecord",
    "iter_jsonl",
    "read_prompts",
    "read_rm",
    "read_sft",
    "write_jsonl",
]
