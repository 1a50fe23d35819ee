"""The adapter versions a policy replica keeps, which one is active, and who uses which: what
both adapter modes share. How a mode serves its versions is in lora.py and merged.py.

Files live under `<data_dir>/policy/adapters/<name>/v<version>/` (the peft files and
`rlhf_adapter.json`, what the push's checks found, the base model among them) and `state.json`
records the active version and the newest version ever accepted per name, so a restart serves
what was served before. A restart restores only versions made for the base it serves; damaged
folders and a damaged state.json are moved aside, and the replica serves what is intact.

A request takes a lease on the version it runs on. Each name keeps its newest `keep_versions`
versions (and the active one); older ones are retired: they take no new requests, and are
unloaded and deleted once their last lease is returned.

A staged version (pushed with a stage deadline) is kept and servable to requests pinned to it,
but not active; activating it commits it, and one not committed by its deadline is dropped. The
deadlines are in state.json, so a restart does not turn a staged version into a kept one.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.files import atomic_write
from rlhf.formats import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from rlhf.plumbing.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from services.policy.engine import AdapterHandle, Engine
from services.policy.stats import EngineStats

log = logging.getLogger("rlhf.policy.adapters")

NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
META_FILE = "rlhf_adapter.json"
STATE_FILE = "state.json"
SET_ASIDE = ".set-aside"  # damaged version folders are moved here at start-up

Key = tuple[str, int]  # (name, version)


def check_name(name: str) -> str:
    """Adapter names become directory names: only a safe alphabet, so no path traversal."""
    if not NAME_RE.match(name or ""):
        raise InvalidArgument(
            f"adapter name {name!r} is invalid: 1-64 characters of [A-Za-z0-9._-], "
            "not starting with '.'"
        )
    return name


def fmt(key: Key | None) -> str:
    return "the base model" if key is None else f"{key[0]}@v{key[1]}"


@dataclass
class Kept:
    handle: AdapterHandle
    sha256: str
    size_bytes: int
    rank: int
    target_modules: list[str]
    loaded_at: float
    in_flight: int = 0
    retiring: bool = False

    @property
    def key(self) -> Key:
        return (self.handle.name, self.handle.version)


@dataclass
class Lease:
    """What a request runs on. `handle` is what the engine is given: None for the base model and
    in merged mode (the version is in the weights)."""

    handle: AdapterHandle | None
    served: Key | None  # None = base
    kept: Kept | None = field(default=None, repr=False)
    pinned: bool = False
    epoch: int = 0  # the registry's weights_epoch when the lease was taken
    # The call running under it (merged mode aborts pinned calls that hold a switch too long).
    task: asyncio.Task | None = field(default=None, repr=False)
    # lora mode: engine requests still to be submitted under this lease, and what to tell the
    # push it waited for once they all are (lora.py).
    unsent: int = 0
    all_sent: Callable[[], None] | None = field(default=None, repr=False)

    def submitted(self) -> None:
        """Engine.generate's on_submit, once per engine request made under this lease."""
        self.unsent -= 1
        if self.unsent <= 0:
            self.let_go()

    def let_go(self) -> None:
        if self.all_sent is not None:
            notify, self.all_sent = self.all_sent, None
            notify()


class AdapterRegistry(abc.ABC):
    """The kept versions and the active one. Subclasses (one per adapter mode) say how requests
    are admitted to a version and what the engine does when versions come, go or switch."""

    mode: str

    def __init__(self, root: Path, engine: Engine, keep_versions: int, stats: EngineStats):
        self.root = root
        self.engine = engine
        self.keep_versions = keep_versions
        self.stats = stats
        self.active: Key | None = None
        # +1 each time the served weights change under running requests (merged mode).
        self.weights_epoch = 0
        self._kept: dict[Key, Kept] = {}
        self._newest: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._switch_lock = asyncio.Lock()
        self._staged: dict[Key, float] = {}  # staged version -> wall-clock commit deadline
        self._expiry: dict[Key, asyncio.TimerHandle] = {}
        self._dropping: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ what each mode does

    @abc.abstractmethod
    async def acquire(self, target: str, pinned: Key | None = None, requests: int = 1) -> Lease:
        """target: "active", "base" or "pinned" (then `pinned` names the version). requests:
        how many engine requests will run under the lease (each reports Lease.submitted)."""

    @abc.abstractmethod
    async def _load(self, kept: Kept, activate: bool) -> None:
        """Makes a new version servable, registers it (`_keep`) and activates it if asked."""

    @abc.abstractmethod
    async def _change_active(self, key: Key | None) -> None:
        """Sets self.active to key (None = base), doing in the engine what the switch needs."""

    @abc.abstractmethod
    async def _make_room(self) -> None:
        """Before a new version is loaded."""

    @abc.abstractmethod
    async def _restore_version(self, kept: Kept) -> None:
        """Start-up: a version found on disk is about to be kept again."""

    @abc.abstractmethod
    async def _restore_active(self, kept: Kept) -> None:
        """Start-up: the version that was active is about to be active again."""

    @abc.abstractmethod
    async def _unload_from_engine(self, kept: Kept) -> None:
        """A version leaves; no request uses it."""

    # ------------------------------------------------------------------ paths and persistence

    def dir_for(self, name: str, version: int) -> Path:
        path = (self.root / check_name(name) / f"v{int(version)}").resolve()
        if self.root.resolve() not in path.parents:  # belt and braces beside check_name
            raise InvalidArgument(f"adapter name {name!r} is invalid")
        return path

    def _save_state(self) -> None:
        state = {
            "active": {"name": self.active[0], "version": self.active[1]} if self.active else None,
            "newest": self._newest,
            "staged": [{"name": n, "version": v, "until": until}
                       for (n, v), until in sorted(self._staged.items())],
        }
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / STATE_FILE, json.dumps(state, indent=1))

    def _read_state(self) -> dict:
        """state.json, or {} when it is missing; a damaged one is moved aside (logged), so the
        replica starts on the base model instead of failing at every start."""
        state_file = self.root / STATE_FILE
        if not state_file.exists():
            return {}
        try:
            state = json.loads(state_file.read_text())
            if not isinstance(state, dict):
                raise ValueError("not an object")
            active = state.get("active")
            if active is not None:
                check_name(active["name"])
                int(active["version"])
            newest = state.get("newest") or {}
            state["newest"] = {check_name(k): int(v) for k, v in newest.items()}
            state["staged"] = {(check_name(x["name"]), int(x["version"])): float(x["until"])
                               for x in state.get("staged") or ()}
            return state
        except (ValueError, KeyError, TypeError, OSError, InvalidArgument) as exc:
            aside = state_file.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
            os.replace(state_file, aside)
            log.error("adapter state %s is damaged (%s); moved it to %s and serving the base "
                      "model", state_file, exc, aside.name)
            return {}

    def _set_aside(self, folder: Path, reason: str) -> None:
        aside = self.root / SET_ASIDE / f"{int(time.time())}-{folder.parent.name}-{folder.name}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, aside)
        log.error("adapter folder %s is damaged (%s); moved it to %s", folder, reason, aside)

    async def restore(self, base_model_id: str | None = None,
                      check_folder: Callable[[Path], None] | None = None) -> None:
        """Keeps the versions found on disk again and re-activates the active one (start-up).
        Only versions made for `base_model_id` that pass `check_folder` (raising a
        ServiceError when a version does not fit this base) are restored; others stay where
        they are, for a replica of their own base, with a log line naming each."""
        state = self._read_state()
        self._newest = dict(state.get("newest") or {})
        found: list[Kept] = []
        for meta_path in sorted(self.root.glob(f"*/v*/{META_FILE}")):
            folder = meta_path.parent
            try:
                meta = json.loads(meta_path.read_text())
                if not ((folder / ADAPTER_WEIGHTS_FILE).exists()
                        and (folder / ADAPTER_CONFIG_FILE).exists()):
                    raise ValueError("files missing")
                kept = self._kept_from_meta(meta, folder)
                if self.dir_for(*kept.key) != folder.resolve():
                    raise ValueError(f"its record names {fmt(kept.key)}")
            except (ValueError, KeyError, TypeError, OSError, InvalidArgument) as exc:
                self._set_aside(folder, str(exc))
                continue
            name, version = kept.key
            # Versions of a name only increase, whatever base they were made for.
            self._newest[name] = max(self._newest.get(name, 0), version)
            made_for = meta.get("base_model_id")
            if base_model_id is not None and made_for != base_model_id:
                log.warning("not restoring adapter %s: it was made for base model %r and this "
                            "replica serves %r (left in %s)", fmt(kept.key), made_for,
                            base_model_id, folder)
                continue
            if check_folder is not None:
                try:
                    check_folder(folder)
                except ServiceError as exc:
                    log.warning("not restoring adapter %s: it does not fit this replica's base "
                                "model (%s; left in %s)", fmt(kept.key), exc.message, folder)
                    continue
            found.append(kept)
        active = state.get("active")
        active_key = (active["name"], int(active["version"])) if active else None
        for kept in sorted(found, key=lambda k: k.key):
            try:
                await self._restore_version(kept)
            except Exception as exc:  # noqa: BLE001 - one bad version must not stop the replica
                log.error("not restoring adapter %s: the engine refused it: %s", fmt(kept.key),
                          exc)
                continue
            self._kept[kept.key] = kept
        if active_key is not None and active_key in self._kept:
            try:
                await self._restore_active(self._kept[active_key])
                self.active = active_key
            except Exception as exc:  # noqa: BLE001
                log.error("could not make %s active again (%s); serving the base model",
                          fmt(active_key), exc)
        elif active_key is not None:
            log.warning("active adapter %s is not restored; serving the base model",
                        fmt(active_key))
        for key, until in (state.get("staged") or {}).items():
            if key in self._kept and key != self.active:
                self.stage(key, until - time.time())  # a past deadline drops it at once
        self._refresh_gauges()
        if self._kept:
            log.info("restored %d adapter version(s); active: %s", len(self._kept),
                     fmt(self.active))

    def _kept_from_meta(self, meta: dict, folder: Path) -> Kept:
        return Kept(
            handle=AdapterHandle(meta["name"], int(meta["version"]), next(self._ids), folder),
            sha256=meta["sha256"],
            size_bytes=int(meta["size_bytes"]),
            rank=int(meta["rank"]),
            target_modules=list(meta["target_modules"]),
            loaded_at=float(meta.get("loaded_at", time.time())),
        )

    # ------------------------------------------------------------------ leases

    def _resolve(self, target: str, pinned: Key | None) -> Kept | None:
        """The kept version a request names (None = the base model)."""
        if target == "pinned":
            kept = self._kept.get(pinned)
            if kept is None or kept.retiring:
                name, version = pinned
                versions = sorted(v for (n, v), k in self._kept.items()
                                  if n == name and not k.retiring)
                if not versions:
                    raise NotFound(f"no adapter named {name!r} is kept by this replica")
                raise NotFound(f"adapter {name}@v{version} is not kept; kept versions: {versions}")
            return kept
        if target == "active" and self.active is not None:
            return self._kept[self.active]
        return None

    def _new_lease(self, kept: Kept | None, handle: AdapterHandle | None,
                   pinned: bool = False) -> Lease:
        if kept is None:
            return Lease(None, None, epoch=self.weights_epoch)
        kept.in_flight += 1
        return Lease(handle, kept.key, kept, pinned=pinned, epoch=self.weights_epoch)

    @property
    def switching(self) -> bool:
        """Whether a switch is holding requests back (merged mode)."""
        return False

    def finished_by(self, lease: Lease) -> tuple[Key | None, bool]:
        """(the version serving now, whether the weights changed since the lease was taken).
        Call it as the request's last tokens arrive."""
        return self.active, self.weights_epoch != lease.epoch

    async def release(self, lease: Lease) -> None:
        lease.let_go()  # ended before all its engine requests were submitted (an error)
        if lease.kept is not None:
            lease.kept.in_flight -= 1
            if lease.kept.retiring and lease.kept.in_flight == 0:
                await self._unload(lease.kept)

    @contextlib.asynccontextmanager
    async def lease(self, target: str, pinned: Key | None = None, requests: int = 1):
        held = await self.acquire(target, pinned, requests)
        try:
            yield held
        finally:
            await self.release(held)

    # ------------------------------------------------------------------ changes

    def next_version(self, name: str) -> int:
        return self._newest.get(name, 0) + 1

    def existing(self, name: str, version: int) -> Kept | None:
        return self._kept.get((name, version))

    def check_new_version(self, name: str, version: int, sha256: str) -> Kept | None:
        """Returns the kept version for an identical re-push; refuses reuse of a version."""
        kept = self._kept.get((name, version))
        if kept is not None and not kept.retiring:
            if kept.sha256 == sha256:
                return kept
            raise AlreadyExists(
                f"adapter {name}@v{version} is already kept with different content; "
                f"push a new version (next: {self.next_version(name)})"
            )
        newest = self._newest.get(name, 0)
        if version <= newest:
            raise FailedPrecondition(
                f"adapter {name} has had version {newest}; versions must increase "
                f"(next: {newest + 1})"
            )
        return None

    async def add(self, meta: dict, folder: Path, activate: bool) -> tuple[Kept, float]:
        """Keeps a checked version installed in `folder` (= dir_for(name, version)), loads it
        and (optionally) activates it. Returns the kept entry and seconds to servable.
        When it raises, the version is not kept and its folder is gone, unless it had become
        active before the error (a push cancelled at its very end): then it stays, active."""
        kept = self._kept_from_meta(meta, folder)
        name = kept.handle.name
        newest = self._newest.get(name)
        try:
            await self._make_room()
            start = time.perf_counter()
            await self._load(kept, activate)
        except BaseException:
            if self.active != kept.key:
                if self._kept.get(kept.key) is kept:
                    await self._unload(kept)
                shutil.rmtree(folder, ignore_errors=True)
                if newest is None:
                    self._newest.pop(name, None)
                else:
                    self._newest[name] = newest
            raise
        seconds = time.perf_counter() - start
        await self._retire_old(name)
        self._refresh_gauges()
        return kept, seconds

    async def _keep(self, kept: Kept, activate: bool) -> None:
        """Registers a loaded version; activates it or just records the new newest version."""
        self._kept[kept.key] = kept
        name, version = kept.key
        self._newest[name] = max(self._newest.get(name, 0), version)
        if activate:
            await self._switch(kept.key)
        else:
            self._save_state()

    async def set_active(self, key: Key | None) -> tuple[Key | None, Key | None]:
        """key None = base model; version 0 = the newest kept. Returns (previous, now)."""
        if key is not None:
            if key[1] == 0:
                versions = [v for (n, v), k in self._kept.items() if n == key[0] and not k.retiring]
                if not versions:
                    raise NotFound(f"no adapter named {key[0]!r} is kept by this replica")
                key = (key[0], max(versions))
            kept = self._kept.get(key)
            if kept is None or kept.retiring:
                raise NotFound(f"adapter {fmt(key)} is not kept by this replica")
        previous = self.active
        await self._switch(key)
        if key in self._staged:
            self._unstage(key)
            self._save_state()
            log.info("staged adapter %s committed", fmt(key))
        if previous is not None:
            await self._retire_old(previous[0])
        self._refresh_gauges()
        return previous, self.active

    async def _switch(self, key: Key | None) -> None:
        async with self._switch_lock:
            if key != self.active:
                await self._change_active(key)
                log.info("active adapter is now %s", fmt(self.active))
            self._save_state()

    async def _retire_old(self, name: str) -> None:
        """Keeps the newest keep_versions of a name (and the active one); retires the rest."""
        versions = sorted((k for (n, _), k in self._kept.items() if n == name and not k.retiring),
                          key=lambda k: k.handle.version, reverse=True)
        for kept in versions[self.keep_versions:]:
            if kept.key == self.active:
                continue
            kept.retiring = True
            if kept.in_flight == 0:
                await self._unload(kept)

    # ------------------------------------------------------------------ staging

    def stage(self, key: Key, seconds: float) -> None:
        """Marks a kept, inactive version staged: dropped unless activated within `seconds`."""
        self._unstage(key)
        self._staged[key] = time.time() + seconds
        loop = asyncio.get_running_loop()
        self._expiry[key] = loop.call_later(max(0.0, seconds), self._expire, key)
        self._save_state()

    def staged_until(self, key: Key) -> float | None:
        return self._staged.get(key)

    def _unstage(self, key: Key) -> None:
        self._staged.pop(key, None)
        timer = self._expiry.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, key: Key) -> None:
        if key not in self._staged:
            return
        log.warning("staged adapter %s was not committed by its deadline; dropping it",
                    fmt(key))
        self.stats.staged_dropped.labels("timeout").inc()
        task = asyncio.get_running_loop().create_task(self.drop(key))
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    def keep(self, key: Key) -> Kept:
        """Ends a version's staging without activating it (a no-op when it is not staged)."""
        kept = self._kept.get(key)
        if kept is None or kept.retiring:
            raise NotFound(f"adapter {fmt(key)} is not kept by this replica")
        if key in self._staged:
            self._unstage(key)
            self._save_state()
            self._refresh_gauges()
            log.info("staged adapter %s kept inactive", fmt(key))
        return kept

    async def drop(self, key: Key) -> bool:
        """Drops a kept version that is not active (it leaves once its running requests end);
        False when it is not kept."""
        kept = self._kept.get(key)
        if kept is None or kept.retiring:
            self._unstage(key)
            return False
        if key == self.active:
            raise FailedPrecondition(
                f"adapter {fmt(key)} is active: activate another version (or the base model) "
                "before dropping it")
        self._unstage(key)
        kept.retiring = True
        if kept.in_flight == 0:
            await self._unload(kept)
        self._save_state()
        self._refresh_gauges()
        log.info("dropped adapter %s", fmt(key))
        return True

    async def _unload(self, kept: Kept) -> None:
        if self._kept.get(kept.key) is not kept:
            return
        self._unstage(kept.key)
        del self._kept[kept.key]
        await self._unload_from_engine(kept)
        shutil.rmtree(kept.handle.path, ignore_errors=True)
        log.info("unloaded adapter %s", kept.handle.engine_name)
        self._refresh_gauges()

    # ------------------------------------------------------------------ views

    def kept(self) -> list[Kept]:
        return sorted((k for k in self._kept.values() if not k.retiring), key=lambda k: k.key)

    def _refresh_gauges(self) -> None:
        self.stats.loaded_adapters.set(len(self._kept))
        self.stats.staged_adapters.set(len(self._staged))
        names = {n for n, _ in self._kept} | set(self._newest)
        for name in names:
            version = self.active[1] if self.active and self.active[0] == name else 0
            self.stats.active_version.labels(name).set(version)
