"""services/trainer/data.py: every accepted format, and every kind of bad line as file:line."""

from __future__ import annotations

import json

import pytest

from services.trainer.data import (
    MAX_LISTED_ERRORS,
    DataError,
    iter_jsonl,
    read_prompts,
    read_sft,
)


def _write(tmp_path, lines: list, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _errors(fn, path) -> list[str]:
    with pytest.raises(DataError) as info:
        fn(path)
    return info.value.errors


# --------------------------------------------------------------------------------------------
# iter_jsonl
# --------------------------------------------------------------------------------------------


def test_iter_jsonl_yields_objects_with_line_numbers_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path, [{"a": 1}, "", "   ", {"b": 2}])
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_iter_jsonl_reports_bad_lines_after_yielding_the_good_ones(tmp_path):
    path = _write(tmp_path, [{"a": 1}, "{not json", "[1, 2]", '"s"', {"b": 2}])
    seen = []
    with pytest.raises(DataError) as info:
        for item in iter_jsonl(path):
            seen.append(item)
    assert seen == [(1, {"a": 1}), (5, {"b": 2})]
    errors = info.value.errors
    assert len(errors) == 3
    assert errors[0].startswith(f"{path}:2: not JSON: ")
    assert errors[1] == f"{path}:3: expected a JSON object, got an array"
    assert errors[2] == f"{path}:4: expected a JSON object, got a string"


def test_iter_jsonl_with_an_error_list_goes_on(tmp_path):
    path = _write(tmp_path, ["nope", {"a": 1}])
    errors: list[str] = []
    assert list(iter_jsonl(path, errors)) == [(2, {"a": 1})]
    assert len(errors) == 1 and errors[0].startswith(f"{path}:1: not JSON")


def test_iter_jsonl_reports_bytes_that_are_not_utf8_and_accepts_a_bom(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"b": "\xff"}\n')
    errors: list[str] = []
    assert list(iter_jsonl(path, errors)) == [(1, {"a": 1})]
    assert errors == [f"{path}:2: not UTF-8 text (byte 8)"]


def test_missing_file_is_a_data_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    errors = _errors(read_sft, path)
    assert errors == [f"{path}: cannot read: No such file or directory"]


def test_empty_file_is_a_data_error(tmp_path):
    path = _write(tmp_path, ["", ""])
    assert _errors(read_prompts, path) == [f"{path}: no records (the file is empty)"]


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_read_prompts_both_forms(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = _write(tmp_path, [{"prompt": "Once upon a time", "answer": "42"}, "",
                             {"messages": messages}])
    first, second = read_prompts(path)
    assert first.prompt == "Once upon a time" and first.messages is None
    assert first.meta == {"answer": "42"}
    assert second.prompt is None and list(second.messages) == messages


def test_read_prompts_reports_every_bad_line(tmp_path):
    lines = [
        {"prompt": "fine"},
        "not json",
        [1],
        {"question": "what?"},
        {"prompt": ""},
        {"prompt": 3},
        {"prompt": "a", "messages": []},
        {"messages": "hello"},
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": ["part"]}]},
        {"messages": ["hi"]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {},
        {"messages": [{"role": "human", "content": "q"}]},
    ]
    path = _write(tmp_path, lines)
    errors = _errors(read_prompts, path)
    reasons = [e.removeprefix(f"{path}:") for e in errors]
    assert reasons == [
        "2: not JSON: Expecting value (column 1)",
        "3: expected a JSON object, got an array",
        '4: needs "prompt" (a string) or "messages" (an array) (found "question")',
        '5: "prompt" is empty',
        '6: "prompt" must be a string, got a number',
        '7: give "prompt" or "messages", not both',
        '8: "messages" must be an array, got a string',
        '9: "messages" is empty',
        '10: "messages"[0] has no "content"',
        '11: "messages"[0].content must be a string, got an array',
        '12: "messages"[0] must be an object, got a string',
        '13: "messages" ends with an assistant turn; a prompt ends before the turn the policy '
        "writes",
        '14: needs "prompt" (a string) or "messages" (an array) (the object is empty)',
        '15: "messages"[0].role is "human"; use one of system, user, assistant, tool',
    ]


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


def test_read_sft_all_three_forms(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = _write(tmp_path, [
        {"prompt": "2+2=", "response": " 4", "id": 7},
        {"text": "Plain text to learn."},
        "",
        {"messages": chat},
    ])
    a, b, c = read_sft(path)
    assert (a.kind, a.prompt, a.response, a.source) == ("prompt_response", "2+2=", " 4",
                                                        f"{path}:1")
    assert (b.kind, b.text) == ("text", "Plain text to learn.")
    assert (c.kind, list(c.messages), c.source) == ("messages", chat, f"{path}:4")


def test_read_sft_reports_every_bad_line(tmp_path):
    lines = [
        {"prompt": "p", "response": "r"},
        "{",
        42,
        {"prompt": "p"},
        {"response": "r"},
        {"prompt": "p", "response": "  "},
        {"prompt": "p", "response": None},
        {"text": True},
        {"text": "t", "prompt": "p", "response": "r"},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        {"completion": "x"},
    ]
    path = _write(tmp_path, lines)
    reasons = [e.removeprefix(f"{path}:") for e in _errors(read_sft, path)]
    assert reasons == [
        "2: not JSON: Expecting property name enclosed in double quotes (column 2)",
        "3: expected a JSON object, got a number",
        '4: has "prompt" but no "response"',
        '5: has "response" but no "prompt"',
        '6: "response" is empty',
        '7: "response" must be a string, got null',
        '8: "text" must be a string, got a boolean',
        '9: give one of "prompt"+"response", "text" or "messages", not several '
        "(found prompt/response and text)",
        '10: "messages" must end with the assistant turn to train on (the last role is "user")',
        "11: \"messages\" needs at least one turn before the assistant's",
        '12: "messages"[1].content is empty',
        '13: needs "prompt" and "response", or "text", or "messages" (found "completion")',
    ]


def test_data_error_message_lists_at_most_the_first_errors(tmp_path):
    path = _write(tmp_path, ["bad"] * (MAX_LISTED_ERRORS + 5))
    with pytest.raises(DataError) as info:
        read_sft(path)
    message = str(info.value)
    assert len(info.value.errors) == MAX_LISTED_ERRORS + 5
    assert message.startswith(f"{MAX_LISTED_ERRORS + 5} problems in the data:\n")
    assert f"{path}:1: not JSON" in message
    assert f"{path}:{MAX_LISTED_ERRORS}: " in message
    assert f"{path}:{MAX_LISTED_ERRORS + 1}: " not in message
    assert message.endswith("... and 5 more")


def test_single_error_message_is_just_that_line(tmp_path):
    path = _write(tmp_path, [{"text": "ok"}, {"text": ""}])
    with pytest.raises(DataError) as info:
        read_sft(path)
    assert str(info.value) == f'{path}:2: "text" is empty'
