"""Contract helpers every caller of `rlhf.v1` needs, in one copy: chat roles, adapter file names,
prompt and score-item builders, and the reward model's input format.

Pure functions over protobuf messages and tokenizers; nothing here imports torch or a service.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rlhf.v1 import common_pb2, reward_pb2

# ---- chat ----------------------------------------------------------------------------------------

# The roles a chat message may have on the wire (common.proto ChatMessage.role).
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def chat_messages(messages: Iterable[Mapping[str, str]]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


def chat_prompt(messages: Iterable[Mapping[str, str]]) -> common_pb2.Prompt:
    """A Prompt the policy renders with its chat template."""
    return common_pb2.Prompt(chat=common_pb2.ChatConversation(messages=chat_messages(messages)))


def user_prompt(text: str) -> common_pb2.Prompt:
    """A plain-text prompt as one user turn of a chat (rendered with the chat template)."""
    return chat_prompt([{"role": "user", "content": text}])


def text_prompt(text: str) -> common_pb2.Prompt:
    """A raw text prompt (no chat template)."""
    return common_pb2.Prompt(text=text)


def score_item(completion: str, *, prompt: str = "",
               messages: Sequence[Mapping[str, str]] = (), reference: str = "",
               metadata: Mapping[str, str] | None = None) -> reward_pb2.ScoreItem:
    """A ScoreItem for a text prompt or a chat prompt (exactly one of `prompt`, `messages`)."""
    item = reward_pb2.ScoreItem(completion=completion, reference=reference,
                                metadata=dict(metadata or {}))
    if messages:
        item.prompt_messages.extend(chat_messages(messages))
    else:
        item.prompt = prompt
    return item


# ---- adapters ------------------------------------------------------------------------------------

# The files of a peft adapter folder (`save_pretrained`) that travel in a push.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


# ---- reward-model input --------------------------------------------------------------------------

# Recorded by `rlhf train rm` in the model folder, read by the reward service, so serving reads
# the text exactly as training did.
RM_META_FILE = "rlhf_reward.json"
RM_FORMATS = ("chat", "pair")


def rm_read_meta(folder: Path) -> dict:
    path = Path(folder) / RM_META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def rm_default_format(tokenizer) -> str:
    """`chat` when the tokenizer has a chat template, else `pair`."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "pair"


def rm_prompt_text(prompt: str | Sequence[Mapping[str, str]]) -> str:
    """A prompt as one string for the `pair` format: a chat becomes `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def rm_chat(prompt: str | Sequence[Mapping[str, str]], completion: str) -> list[dict[str, str]]:
    """The `chat` format's conversation: the prompt (a text is one user turn), then the
    completion as the assistant turn."""
    turns = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
             else [{"role": m["role"], "content": m["content"]} for m in prompt])
    return [*turns, {"role": "assistant", "content": completion}]


def rm_tokenize(tokenizer, fmt: str, prompts: Sequence[str | Sequence[Mapping[str, str]]],
                completions: Sequence[str], max_tokens: int, **kwargs):
    """Token ids of (prompt, completion) pairs in the reward model's input format.

    - `chat`: the conversation rendered with the chat template. Decoder models read the reward
      at the last token, so the completion's end must survive truncation: cut from the left.
    - `pair`: the tokenizer's text-pair encoding (`[CLS] prompt [SEP] completion [SEP]`).
    `kwargs` go to the tokenizer call (e.g. padding=True, return_tensors="pt")."""
    if fmt not in RM_FORMATS:
        raise ValueError(f"unknown reward-model input format {fmt!r}; use one of {RM_FORMATS}")
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    common = dict(truncation=True, max_length=max_tokens, **kwargs)
    if fmt == "chat":
        texts = [tokenizer.apply_chat_template(rm_chat(p, c), tokenize=False)
                 for p, c in zip(prompts, completions, strict=True)]
        return tokenizer(texts, add_special_tokens=False, **common)
    return tokenizer([rm_prompt_text(p) for p in prompts], list(completions), **common)


# ---- chat roles of OpenAI's API ------------------------------------------------------------------

# OpenAI's chat API also calls the system turn "developer"; chat templates know only "system".
ROLE_ALIASES: dict[str, str] = {"developer": "system"}


def wire_role(role: str) -> str:
    """A chat role as the wire has it: an alias becomes its role in ROLES."""
    return ROLE_ALIASES.get(role, role)


# ---- the base model an adapter belongs to --------------------------------------------------------

# config.json keys that say how a folder was saved, not what the model is.
_SAVE_ONLY_KEYS = frozenset({"transformers_version", "torch_dtype", "dtype", "_name_or_path"})


def base_model_fingerprint(model_dir: Path) -> str:
    """What makes two base-model folders the same model for a LoRA adapter, as 16 hex digits:
    the sha256 of config.json (less the keys that only say how it was saved) and of the
    tokenizer's files. Folder names can agree by chance; these cannot. "" when the folder has
    no config.json (nothing to compare). Weights are not hashed: that would read gigabytes at
    every start."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return ""
    config = json.loads(config_file.read_text())
    digest = hashlib.sha256(json.dumps(
        {k: v for k, v in config.items() if k not in _SAVE_ONLY_KEYS}, sort_keys=True).encode())
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        if (model_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    return digest.hexdigest()[:16]
