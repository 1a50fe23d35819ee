"""What a StartRun request may name: a run id and an adapter name that are safe folder names on
the trainer and on every policy replica, and model, init adapter and prompts paths that resolve
(after symlinks) under the trainer's allowed roots. Errors are InvalidArgument naming the field.

The paths the trainer's own config gives (its model and prompts) are trusted as configured; only
paths that arrive in a request are checked. The prompts file is checked again, for kind and size,
just before the run reads it (`check_prompts_file`), so a file swapped after the request cannot
feed the run a FIFO or a multi-gigabyte line.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Sequence
from pathlib import Path

from rlhf.plumbing.errors import InvalidArgument

# Starts with a letter or digit: no ".", "..", hidden names (the policy stages pushes in
# `.incoming`) or names that read as command-line flags.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Files and folders the trainer's run folder and the policy's adapter folder hold next to the
# named ones; compared without case (case-insensitive file systems).
RESERVED_NAMES = frozenset({
    "state.json", "latest", "checkpoints", "metrics.jsonl", "latest-adapter", "initial-adapter",
    "evaluation.json",
    "rlhf_adapter.json", "adapter_config.json", "adapter_model.safetensors",
})


def check_name(value: str, field: str) -> str:
    """`value` as a run id or adapter name, or InvalidArgument naming `field`."""
    if not NAME_RE.match(value or ""):
        raise InvalidArgument(f"{field} {value!r} must be 1-64 characters of [A-Za-z0-9._-] "
                              "starting with a letter or digit")
    if ".." in value:
        raise InvalidArgument(f"{field} {value!r} must not contain '..'")
    if value.lower() in RESERVED_NAMES:
        raise InvalidArgument(f"{field} {value!r} is reserved (a file name the trainer or the "
                              "policy keeps next to run and adapter folders); choose another")
    return value


def check_path(value: str, field: str, roots: Sequence[Path], kind: str) -> Path:
    """The request's path `value` resolved (symlinks followed), or InvalidArgument naming
    `field` when it lies outside every root or is not an existing `kind` ("dir" or "file")."""
    if "\x00" in value:
        raise InvalidArgument(f"{field} must not contain NUL characters")
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise InvalidArgument(f"{field} {value!r} must be an absolute path on the trainer")
    resolved = path.resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise InvalidArgument(
            f"{field} {value!r} is outside the folders this trainer reads from "
            f"({', '.join(str(r) for r in roots)}; see allowed_roots)")
    exists = resolved.is_dir() if kind == "dir" else resolved.is_file()
    if not exists:
        what = "a folder" if kind == "dir" else "a regular file"
        raise InvalidArgument(f"{field} {value!r} is not {what} on the trainer")
    return resolved


def check_prompts_file(path: Path, max_bytes: int) -> None:
    """A prompts file the run may read in full: a regular file of at most `max_bytes`. Blocking
    (a stat); call it off the event loop."""
    try:
        info = path.stat()
    except OSError as exc:
        raise InvalidArgument(f"prompts_path {str(path)!r}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(f"prompts_path {str(path)!r} is not a regular file")
    if info.st_size > max_bytes:
        raise InvalidArgument(f"prompts_path {str(path)!r} holds {info.st_size} bytes; this "
                              f"trainer reads at most {max_bytes} (max_prompts_bytes)")


MODULE_RE = re.compile(r"^[A-Za-z0-9_.]{1,128}$")
MAX_TARGET_MODULES = 64


def check_target_modules(values: Sequence[str]) -> list[str]:
    """LoRA target module names: plain dotted names (never a regex), at most 64 of them."""
    if len(values) > MAX_TARGET_MODULES:
        raise InvalidArgument(f"target_modules lists {len(values)} names; at most "
                              f"{MAX_TARGET_MODULES}")
    for value in values:
        if not MODULE_RE.match(value):
            raise InvalidArgument(f"target_modules entry {value[:140]!r} must be a module name "
                                  "of 1-128 characters of [A-Za-z0-9_.]")
    return list(values)
