"""Reading a service's log file while it runs: its last lines (shown when it fails), its newest
line (the start-up progress) and whether a marker such as `READY policy` was printed since an
offset (the current start's output in a log that restarts append to)."""

from __future__ import annotations

import os
from pathlib import Path

LOG_TAIL_LINES = 25


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def last_line(path: Path, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(offset, size - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def log_has(path: Path, offset: int, marker: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return marker.encode() in f.read()
    except OSError:
        return False
