"""User reward functions (`python:MODULE:FUNCTION`), called the way TRL calls reward functions:
`f(prompts, completions, **kwargs) -> list[float]`.

Per item, a text prompt is passed as a string with the completion as a string; a chat prompt as
its list of `{"role", "content"}` messages with the completion as `[{"role": "assistant",
"content": ...}]` (TRL's conversational shape). Keyword lists: `reference` (one string per item)
and one list per metadata key (None where an item lacks the key).

MODULE is an importable module name or a path to a `.py` file. It is imported at start-up, so a
typo stops the service instead of failing every call.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

from rlhf.plumbing.errors import FailedPrecondition, InvalidArgument
from services.reward.items import Item

RESERVED = ("prompts", "completions", "reference")


def load_function(arg: str) -> Callable:
    module_name, sep, attr = arg.rpartition(":")
    spec = f"python:{arg}"
    if not sep or not module_name or not attr:
        raise FailedPrecondition(f"{spec}: expected python:MODULE:FUNCTION")
    try:
        if module_name.endswith(".py"):
            module = _import_file(Path(module_name).expanduser())
        else:
            module = importlib.import_module(module_name)
    except FailedPrecondition:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure stops start-up with its cause
        raise FailedPrecondition(
            f"{spec}: cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from exc
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise FailedPrecondition(f"{spec}: {module_name} has no attribute {attr!r}")
    if not callable(target):
        raise FailedPrecondition(f"{spec}: {attr} is not callable")
    return target


def _import_file(path: Path):
    if not path.is_file():
        raise FailedPrecondition(f"python scorer file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"rlhf_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_arguments(items: list[Item]) -> tuple[list, list, dict[str, list]]:
    prompts = [it.message_dicts() if it.is_chat else it.prompt for it in items]
    completions = [
        [{"role": "assistant", "content": it.completion}] if it.is_chat else it.completion
        for it in items
    ]
    keys: list[str] = []
    for i, it in enumerate(items):
        for key in it.metadata:
            if key in RESERVED:
                raise InvalidArgument(
                    f"items[{i}].metadata key {key!r} is reserved (passed to user functions as "
                    "an argument of that name)"
                )
            if key not in keys:
                keys.append(key)
    kwargs: dict[str, list] = {"reference": [it.reference for it in items]}
    for key in keys:
        kwargs[key] = [it.metadata.get(key) for it in items]
    return prompts, completions, kwargs


def is_async(fn: Callable) -> bool:
    # Callable objects count too: an instance whose class has `async def __call__`.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)
