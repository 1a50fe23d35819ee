"""What a scorer sees: an item of a Score call, checked against the contract and the limits.
Every problem is the caller's, so it is INVALID_ARGUMENT with the item's index."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.formats import ROLES, rm_prompt_text
from rlhf.plumbing.errors import InvalidArgument


@dataclass(frozen=True)
class Item:
    completion: str
    prompt: str = ""  # set when the prompt is plain text
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) when the prompt is a chat
    reference: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def prompt_value(self) -> str | list[dict[str, str]]:
        """The prompt as `rlhf.formats` takes it: the text, or the chat's turns."""
        return self.message_dicts() if self.is_chat else self.prompt

    def prompt_text(self) -> str:
        """The prompt as one string, for scorers that read text (a chat becomes `role: text`
        lines, the same rendering the reward-model trainer uses)."""
        return rm_prompt_text(self.prompt_value())


def parse_items(items, max_items: int, max_chars: int) -> list[Item]:
    """Proto ScoreItems -> Items; raises InvalidArgument naming the first bad field."""
    if not items:
        raise InvalidArgument("items is empty: send at least one item to score")
    if len(items) > max_items:
        raise InvalidArgument(f"{len(items)} items in one call; at most {max_items} are accepted")
    return [_parse_item(i, item, max_chars) for i, item in enumerate(items)]


def _check_text(where: str, text: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise InvalidArgument(f"{where} has {len(text)} characters; at most {max_chars}")


def _parse_item(i: int, item, max_chars: int) -> Item:
    where = f"items[{i}]"
    if not item.completion:
        raise InvalidArgument(f"{where}.completion is empty")
    _check_text(f"{where}.completion", item.completion, max_chars)
    _check_text(f"{where}.reference", item.reference, max_chars)
    if item.prompt and item.prompt_messages:
        raise InvalidArgument(f"{where}: set prompt or prompt_messages, not both")
    if not item.prompt and not item.prompt_messages:
        raise InvalidArgument(f"{where}: the prompt is empty (set prompt or prompt_messages)")
    _check_text(f"{where}.prompt", item.prompt, max_chars)
    messages = []
    total = 0
    for j, msg in enumerate(item.prompt_messages):
        if msg.role not in ROLES:
            raise InvalidArgument(
                f"{where}.prompt_messages[{j}].role {msg.role!r} is not one of {', '.join(ROLES)}"
            )
        if msg.role == "user" and not msg.content:
            raise InvalidArgument(f"{where}.prompt_messages[{j}] is a user turn with no content")
        total += len(msg.content)
        messages.append((msg.role, msg.content))
    if total > max_chars:
        raise InvalidArgument(
            f"{where}.prompt_messages have {total} characters in all; at most {max_chars}"
        )
    for key, value in item.metadata.items():
        _check_text(f"{where}.metadata[{key!r}]", value, max_chars)
    return Item(
        completion=item.completion,
        prompt=item.prompt,
        messages=tuple(messages),
        reference=item.reference,
        metadata=dict(item.metadata),
    )
