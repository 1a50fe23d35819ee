"""The reward-model versions kept on disk: one folder per version under the store root
(`<root>/<version>/`, the model's files and `rlhf_rm_version.json`, what the push said and
where its bytes came from) and `state.json` naming the active version, so a restart serves what
was served before.

A push's bytes stream into `<root>/.incoming/<random>/` with a running sha256 and size bounds,
file by file as the header lists them; the folder is installed in one rename. Version names and
file names come from a fixed alphabet (no `/`, no leading `.`), so no name reaches outside the
root. At start-up, leftovers of unfinished pushes are removed, and damaged version folders
(record missing or unreadable, a file missing or of the wrong size, a record naming another
folder) and a damaged state.json are moved to `<root>/.set-aside/` with a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.files import atomic_dir, atomic_write
from rlhf.plumbing.errors import FailedPrecondition, InvalidArgument
from rlhf.v1 import reward_pb2

log = logging.getLogger("rlhf.reward.versions")

VERSION_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
FILE_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
META_FILE = "rlhf_rm_version.json"
STATE_FILE = "state.json"
STAGING = ".incoming"
SET_ASIDE = ".set-aside"
MAX_CHUNK = 4 * 1024 * 1024
MAX_FILES = 64
MAX_METADATA = 32
MAX_METADATA_CHARS = 1024


def check_version(version: str) -> str:
    """Version names become folder names: only a safe alphabet, so no path tricks."""
    if not VERSION_RE.match(version or ""):
        raise InvalidArgument(
            f"reward-model version {version!r} is invalid: 1-64 characters of [A-Za-z0-9._-], "
            "not starting with '.'")
    return version


@dataclass
class Version:
    name: str
    folder: Path
    sha256: str
    size_bytes: int
    files: dict[str, int]  # name -> size, in push order
    pushed_at: float
    heldout_accuracy: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict:
        return {"version": self.name, "sha256": self.sha256, "size_bytes": self.size_bytes,
                "files": self.files, "pushed_at": self.pushed_at,
                "heldout_accuracy": self.heldout_accuracy, "metadata": self.metadata}

    @classmethod
    def from_record(cls, record: dict, folder: Path) -> Version:
        accuracy = record.get("heldout_accuracy")
        return cls(
            name=check_version(record["version"]), folder=folder, sha256=str(record["sha256"]),
            size_bytes=int(record["size_bytes"]),
            files={str(k): int(v) for k, v in record["files"].items()},
            pushed_at=float(record["pushed_at"]),
            heldout_accuracy=None if accuracy is None else float(accuracy),
            metadata={str(k): str(v) for k, v in (record.get("metadata") or {}).items()})

    def info(self, active: bool) -> reward_pb2.RewardModelInfo:
        info = reward_pb2.RewardModelInfo(version=self.name, sha256=self.sha256,
                                          size_bytes=self.size_bytes, metadata=self.metadata,
                                          active=active)
        info.pushed_at.FromNanoseconds(int(self.pushed_at * 1e9))
        if self.heldout_accuracy is not None:
            info.heldout_accuracy = self.heldout_accuracy
        return info


def check_header(header: reward_pb2.RewardModelHeader, max_bytes: int) -> None:
    """Everything a header can be refused for before a byte is stored."""
    check_version(header.version)
    if not re.fullmatch(r"[0-9a-f]{64}", header.sha256):
        raise InvalidArgument("sha256 must be 64 lower-case hex characters")
    if not header.files:
        raise InvalidArgument("the header lists no files")
    if len(header.files) > MAX_FILES:
        raise InvalidArgument(f"the header lists {len(header.files)} files; at most {MAX_FILES}")
    names = [f.name for f in header.files]
    for name in names:
        if not FILE_RE.match(name) or name == META_FILE:
            raise InvalidArgument(
                f"file name {name!r} is invalid: 1-128 characters of [A-Za-z0-9._-], not "
                f"starting with '.', no folders, not {META_FILE}")
    if len(set(names)) != len(names):
        raise InvalidArgument("the header lists a file twice")
    if "config.json" not in names and "adapter_config.json" not in names:
        raise InvalidArgument("a reward-model folder needs config.json (or adapter_config.json)")
    if sum(f.size_bytes for f in header.files) != header.size_bytes:
        raise InvalidArgument("size_bytes is not the sum of the files' sizes")
    if header.size_bytes > max_bytes:
        # INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: clients retry the latter, and this push
        # will never fit.
        raise InvalidArgument(f"the push is {header.size_bytes} bytes; this server takes at "
                              f"most {max_bytes} (max_rm_push_bytes)")
    if header.HasField("heldout_accuracy") and not (
            math.isfinite(header.heldout_accuracy) and 0.0 <= header.heldout_accuracy <= 1.0):
        raise InvalidArgument("heldout_accuracy must be within [0, 1]")
    if len(header.metadata) > MAX_METADATA or any(
            len(k) + len(v) > MAX_METADATA_CHARS for k, v in header.metadata.items()):
        raise InvalidArgument(f"metadata: at most {MAX_METADATA} entries of "
                              f"{MAX_METADATA_CHARS} characters")


class RewardModelStore:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.versions: dict[str, Version] = {}
        self.active: str | None = None

    # ------------------------------------------------------------------ paths and state

    def dir_for(self, version: str) -> Path:
        path = (self.root / check_version(version)).resolve()
        if path.parent != self.root.resolve():  # belt and braces beside check_version
            raise InvalidArgument(f"reward-model version {version!r} is invalid")
        return path

    def kept(self) -> list[Version]:
        """Oldest first."""
        return sorted(self.versions.values(), key=lambda v: (v.pushed_at, v.name))

    def save_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / STATE_FILE, json.dumps({"active": self.active}, indent=1))

    def _set_aside(self, path: Path, reason: str) -> None:
        aside = self.root / SET_ASIDE / f"{int(time.time())}-{uuid.uuid4().hex[:6]}-{path.name}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, aside)
        log.error("reward-model store: %s is damaged (%s); moved it to %s", path, reason, aside)

    def restore(self) -> None:
        """Start-up: drops unfinished pushes, reads the kept versions and the active one."""
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root / STAGING, ignore_errors=True)
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                version = Version.from_record(json.loads((folder / META_FILE).read_text()),
                                              folder)
                if version.name != folder.name:
                    raise ValueError(f"its record names version {version.name!r}")
                for name, size in version.files.items():
                    if not FILE_RE.match(name) or (folder / name).stat().st_size != size:
                        raise ValueError(f"file {name} is missing or of the wrong size")
            except (ValueError, KeyError, TypeError, AttributeError, OSError,
                    InvalidArgument) as exc:
                self._set_aside(folder, str(exc))
                continue
            self.versions[version.name] = version
        self.active = self._read_active()
        if self.active is not None and self.active not in self.versions:
            log.error("reward-model store: the active version %s is not kept", self.active)
            self.active = None

    def _read_active(self) -> str | None:
        state_file = self.root / STATE_FILE
        if not state_file.exists():
            return None
        try:
            active = json.loads(state_file.read_text())["active"]
            return None if active is None else check_version(active)
        except (ValueError, KeyError, TypeError, OSError, InvalidArgument) as exc:
            self._set_aside(state_file, str(exc))
            return None

    # ------------------------------------------------------------------ changes

    async def receive(self, header: reward_pb2.RewardModelHeader, chunks) -> Path:
        """Streams the data chunks into a staging folder, file by file; returns the folder.
        On any error the folder is removed and the error raised."""
        staged = self.root / STAGING / uuid.uuid4().hex
        staged.mkdir(parents=True)
        try:
            await self._receive(header, chunks, staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged

    async def _receive(self, header, chunks, staged: Path) -> None:
        digest = hashlib.sha256()
        files = iter(header.files)
        left, out = 0, None
        received = 0
        try:
            async for msg in chunks:
                if msg.WhichOneof("part") != "data":
                    raise InvalidArgument("only the first message may be a header; then data")
                data = msg.data
                if len(data) > MAX_CHUNK:
                    raise InvalidArgument(f"a data chunk is larger than {MAX_CHUNK} bytes")
                received += len(data)
                if received > header.size_bytes:
                    raise InvalidArgument(
                        f"received more than the {header.size_bytes} bytes the header announced")
                digest.update(data)
                view = memoryview(data)
                while view:
                    while left == 0:  # next file (empty files are created as they are passed)
                        if out is not None:
                            out.close()
                        entry = next(files)
                        left = entry.size_bytes
                        out = open(staged / entry.name, "wb")  # noqa: SIM115 - closed above
                    part = view[:left]
                    out.write(part)
                    left -= len(part)
                    view = view[len(part):]
        finally:
            if out is not None:
                out.close()
        if received < header.size_bytes:
            raise InvalidArgument(
                f"stream ended after {received} of {header.size_bytes} bytes (truncated upload)")
        for f in header.files:  # empty files after the last byte
            if not (staged / f.name).exists():
                (staged / f.name).write_bytes(b"")
        if digest.hexdigest() != header.sha256:
            raise InvalidArgument(f"sha256 mismatch: header says {header.sha256}, data hashes to "
                                  f"{digest.hexdigest()}")

    def install(self, staged: Path, header: reward_pb2.RewardModelHeader) -> Version:
        """Moves a checked staging folder to its version folder in one rename, with its record."""
        version = Version(
            name=header.version, folder=self.dir_for(header.version), sha256=header.sha256,
            size_bytes=header.size_bytes, files={f.name: f.size_bytes for f in header.files},
            pushed_at=time.time(),
            heldout_accuracy=(header.heldout_accuracy if header.HasField("heldout_accuracy")
                              else None),
            metadata=dict(header.metadata))
        with atomic_dir(version.folder) as tmp:
            for name in version.files:
                os.replace(staged / name, tmp / name)
            (tmp / META_FILE).write_text(json.dumps(version.record(), indent=1))
        shutil.rmtree(staged, ignore_errors=True)
        self.versions[version.name] = version
        return version

    def import_folder(self, source: Path, name: str) -> Version:
        """Stores a local reward-model folder as version `name` (the service's initial one)."""
        source = Path(source).expanduser()
        if not source.is_dir():
            raise FailedPrecondition(f"reward-model folder {source} does not exist")
        files = sorted(p for p in source.iterdir()
                       if p.is_file() and FILE_RE.match(p.name) and p.name != META_FILE)
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(MAX_CHUNK), b""):
                    digest.update(block)
        header = reward_pb2.RewardModelHeader(
            version=name, sha256=digest.hexdigest(),
            files=[reward_pb2.RewardModelFile(name=p.name, size_bytes=p.stat().st_size)
                   for p in files],
            size_bytes=sum(p.stat().st_size for p in files),
            metadata={"source": str(source)})
        staged = self.root / STAGING / uuid.uuid4().hex
        staged.mkdir(parents=True)
        for path in files:
            shutil.copyfile(path, staged / path.name)
        return self.install(staged, header)

    def discard(self, name: str) -> None:
        version = self.versions.pop(name, None)
        if version is not None:
            shutil.rmtree(version.folder, ignore_errors=True)

    def set_aside_version(self, name: str, reason: str) -> None:
        version = self.versions.pop(name, None)
        if version is not None and version.folder.exists():
            self._set_aside(version.folder, reason)

    def retire_old(self, keep: int) -> list[str]:
        """Deletes the oldest versions beyond `keep` (never the active one); returns their
        names."""
        removed = []
        for version in self.kept()[:-keep] if keep < len(self.versions) else []:
            if version.name != self.active:
                self.discard(version.name)
                removed.append(version.name)
        return removed
