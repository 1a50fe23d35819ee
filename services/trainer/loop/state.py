"""The loop's folder: what survives between rounds and restarts.

    FOLDER/state.json      cursor of the last pair a pushed version learnt from, version counter,
                           the round refused on the pending pairs (if any)
    FOLDER/heldout.jsonl   old held-out pairs (the newest max_heldout_pairs)
    FOLDER/versions/NAME/  the reward models this loop pushed (warm starts of later rounds)
    FOLDER/rounds.jsonl    one record per round: figures and decision
    FOLDER/work/           the round in progress (data, candidate model)

state.json is replaced atomically, and only after a version is pushed and activated: a crash
before that repeats the round on the same pairs, never skips them."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.files import atomic_write
from services.trainer.loop.export import LoopError

STATE_FILE = "state.json"
HELDOUT_FILE = "heldout.jsonl"
ROUNDS_FILE = "rounds.jsonl"


@dataclass
class LoopState:
    cursor: str | None = None  # the export cursor of the last pair learnt from
    counter: int = 0  # of the versions this loop named
    active: str | None = None  # the version this loop pushed last
    # A refused round: its start cursor and pair count. The same pairs are not retrained until
    # every_new_pairs more have arrived.
    refused: dict | None = None


class LoopFolder:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.versions = self.root / "versions"
        self.work = self.root / "work"

    # ---- state ----------------------------------------------------------------------------

    def load_state(self) -> LoopState:
        path = self.root / STATE_FILE
        if not path.exists():
            return LoopState()
        try:
            data = json.loads(path.read_text())
            return LoopState(**data)
        except (ValueError, TypeError) as exc:
            raise LoopError(f"{path} is not a loop state file ({exc}); move it away to start "
                            "over from the first pair") from None

    def save_state(self, state: LoopState) -> None:
        atomic_write(self.root / STATE_FILE, (json.dumps(asdict(state), indent=2) + "\n").encode(),
                     0o644)

    # ---- held-out pairs -------------------------------------------------------------------

    def heldout(self) -> list[dict]:
        path = self.root / HELDOUT_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def add_heldout(self, rows: list[dict], keep: int) -> None:
        """Appends `rows` not already held (same request, chosen, rejected); keeps the newest
        `keep`."""
        old = self.heldout()
        seen = {_key(r) for r in old}
        merged = old + [r for r in rows if _key(r) not in seen]
        body = "".join(json.dumps(r) + "\n" for r in merged[-keep:])
        atomic_write(self.root / HELDOUT_FILE, body.encode(), 0o644)

    # ---- versions -------------------------------------------------------------------------

    def version_dir(self, name: str) -> Path:
        return self.versions / name

    def keep(self, name: str, candidate: Path) -> Path:
        """Moves a pushed candidate to versions/NAME."""
        target = self.version_dir(name)
        self.versions.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        candidate.rename(target)
        return target

    def prune(self, keep: int, active: str | None) -> None:
        """Removes all but the newest `keep` version folders (never the active one)."""
        if not self.versions.exists():
            return
        folders = sorted(self.versions.iterdir(), key=lambda p: p.stat().st_mtime)
        for folder in folders[:-keep]:
            if folder.name != active:
                shutil.rmtree(folder, ignore_errors=True)

    # ---- the round log --------------------------------------------------------------------

    def log_round(self, record: dict) -> None:
        with (self.root / ROUNDS_FILE).open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def rounds(self) -> list[dict]:
        path = self.root / ROUNDS_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(row: dict) -> tuple:
    return (row.get("request_id"), row["chosen"], row["rejected"])


def is_heldout(request_id: str, fraction: float) -> bool:
    """Whether an answer's pairs are held out: a hash of its request id, so every pair of one
    answer lands on one side, and the same side in every round."""
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
