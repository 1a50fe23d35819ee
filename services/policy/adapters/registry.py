"""The adapter versions a policy replica keeps, which one is active, and who is using which.

Files live under `<data_dir>/policy/adapters/<name>/v<version>/` and `state.json` records the
active version and the newest version ever accepted per name, so a restart serves what was
served before. A request takes a lease on the version it runs on; an old version is unloaded and
deleted only when it is no longer kept *and* its last lease is returned.

In `lora` mode every kept version is loaded in vLLM and servable. In `merged` mode only the active
version is servable: it is merged into the base weights in place. A switch waits for the requests
pinned to the old version (they asked for exactly those weights) while new requests wait for the
switch; requests that follow the active version go on with the new weights without waiting, and
their responses name both versions (`Lease.finished_by`), so a label never hides a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.plumbing.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.policy.engine import AdapterHandle, Engine
from services.policy.stats import EngineStats

log = logging.getLogger("rlhf.policy.adapters")

NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
META_FILE = "rlhf_adapter.json"
# lora mode: how long a push keeps the engine paused after its load for the requests that
# waited for it to be submitted (normally a few ms; every request stalls meanwhile).
HOLD_SEND_SECONDS = 0.05


def check_name(name: str) -> str:
    """Adapter names become directory names: only a safe alphabet, so no path traversal."""
    if not NAME_RE.match(name or ""):
        raise InvalidArgument(
            f"adapter name {name!r} is invalid: 1-64 characters of [A-Za-z0-9._-], "
            "not starting with '.'"
        )
    return name


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
    def key(self) -> tuple[str, int]:
        return (self.handle.name, self.handle.version)


class Incoming:
    """lora mode: a checked version the engine is loading to make active, and the requests
    that follow the active version waiting for it."""

    def __init__(self):
        self.done = asyncio.Event()  # active now, or refused
        self.waiting = 0  # requests waiting on `done`
        self.unsent = 0  # requests it let go whose engine requests aren't all submitted yet
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def all_sent(self) -> None:
        while self.waiting or self.unsent:
            self._changed.clear()
            await self._changed.wait()


@dataclass
class Lease:
    """What a request runs on. `handle` is None for the base model and in merged mode."""

    handle: AdapterHandle | None
    served: tuple[str, int] | None  # (name, version), None = base
    kept: Kept | None = field(default=None, repr=False)
    pinned: bool = False
    epoch: int = 0  # the registry's weights_epoch when the lease was taken
    # lora mode: the push this request waited for, until all its engine requests are submitted
    waited_for: Incoming | None = field(default=None, repr=False)
    unsent: int = 0

    def submitted(self) -> None:
        """Engine.generate's on_submit, once per engine request made under this lease."""
        self.unsent -= 1
        if self.unsent <= 0:
            self.let_go()

    def let_go(self) -> None:
        if self.waited_for is not None:
            self.waited_for.unsent -= 1
            self.waited_for.changed()
            self.waited_for = None


class AdapterRegistry:
    def __init__(self, root: Path, engine: Engine, mode: str, keep_versions: int,
                 max_loaded: int, stats: EngineStats):
        self.root = root
        self.engine = engine
        self.mode = mode
        self.keep_versions = keep_versions
        self.max_loaded = max_loaded
        self.stats = stats
        self.active: tuple[str, int] | None = None
        self._kept: dict[tuple[str, int], Kept] = {}
        self._newest: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._switch_lock = asyncio.Lock()
        self._pinned_in_flight = 0
        # merged mode: +1 each time the served weights change in place.
        self.weights_epoch = 0
        # merged mode: cleared while the served weights change; pinned requests wait on it.
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Condition()
        # lora mode: the verified pushes the engine is loading to make active. Requests that
        # follow the active version wait for them.
        self._incoming: set[Incoming] = set()

    # ------------------------------------------------------------------ paths and persistence

    def dir_for(self, name: str, version: int) -> Path:
        path = (self.root / check_name(name) / f"v{int(version)}").resolve()
        if self.root.resolve() not in path.parents:  # belt and braces beside check_name
            raise InvalidArgument(f"adapter name {name!r} is invalid")
        return path

    def incoming_dir(self) -> Path:
        path = self.root / ".incoming"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _save_state(self) -> None:
        state = {
            "active": {"name": self.active[0], "version": self.active[1]} if self.active else None,
            "newest": self._newest,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.root / "state.json")

    async def restore(self) -> None:
        """Reloads the kept versions and the active one from disk (start-up)."""
        shutil.rmtree(self.root / ".incoming", ignore_errors=True)
        state_file = self.root / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        self._newest = {k: int(v) for k, v in (state.get("newest") or {}).items()}
        found: list[Kept] = []
        for meta_path in sorted(self.root.glob(f"*/v*/{META_FILE}")):
            try:
                meta = json.loads(meta_path.read_text())
                folder = meta_path.parent
                if not (folder / WEIGHTS_FILE).exists() or not (folder / CONFIG_FILE).exists():
                    raise ValueError("files missing")
                found.append(self._kept_from_meta(meta, folder))
            except (ValueError, KeyError, OSError) as exc:
                log.warning("ignoring damaged adapter folder %s: %s", meta_path.parent, exc)
        active = state.get("active")
        active_key = (active["name"], int(active["version"])) if active else None
        for kept in sorted(found, key=lambda k: k.key):
            self._newest[kept.handle.name] = max(self._newest.get(kept.handle.name, 0),
                                                 kept.handle.version)
            if self.mode == "lora":
                await self.engine.add_adapter(kept.handle)
            self._kept[kept.key] = kept
        if active_key is not None and active_key in self._kept:
            if self.mode == "merged":
                await self.engine.load_merged(self._kept[active_key].handle.path)
            self.active = active_key
        elif active_key is not None:
            log.warning("active adapter %s@v%d is gone from disk; serving the base model",
                        *active_key)
        self._refresh_gauges()
        if self._kept:
            log.info("restored %d adapter version(s); active: %s", len(self._kept),
                     _fmt(self.active))

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

    async def acquire(self, target: str, pinned: tuple[str, int] | None = None,
                      requests: int = 1) -> Lease:
        """target: "active", "base" or "pinned". Resolved now: a later switch doesn't move it,
        except in merged mode, where an unpinned request follows the weights (see finished_by).
        requests: how many engine requests will run under the lease (they report
        Lease.submitted)."""
        waited_for = None
        if self.mode == "merged":
            if target != "active":
                # Pinned requests run on one version from start to end, so they wait out a
                # switch; new ones must not hold back the drain the switch waits for. Requests
                # that follow the active version go in at once: under the old version's label,
                # and the switch moves them like the running ones (finished_by says so). One
                # that reaches the paused engine is computed wholly on the new weights in the
                # first step after the switch.
                await self._open.wait()
            if target == "base" or (target == "pinned" and pinned != self.active):
                what = "the base model" if target == "base" else _fmt(pinned)
                raise FailedPrecondition(
                    f"this replica runs in merged adapter mode and serves only the active "
                    f"version ({_fmt(self.active)}), not {what}; use a replica in lora mode"
                )
            if target == "pinned":
                self._pinned_in_flight += 1
                kept = self._kept[self.active]
                kept.in_flight += 1
                return Lease(None, kept.key, kept, pinned=True, epoch=self.weights_epoch)
            target = "active"
        elif target == "active" and self._incoming:
            # A checked version is being loaded to become active (the rest of an engine step
            # and ~35 ms, with the engine paused). A request started now on the version it
            # replaces would produce the new version's first token a step later than one
            # that waits: the push lets the engine go on only once the requests that waited
            # are in, so they run in the first step after the load.
            for incoming in list(self._incoming):
                incoming.waiting += 1
                try:
                    await incoming.done.wait()
                finally:
                    incoming.waiting -= 1
                    incoming.changed()
                waited_for = incoming
        if target == "pinned":
            kept = self._kept.get(pinned)
            if kept is None or kept.retiring:
                name, version = pinned
                versions = sorted(v for (n, v), k in self._kept.items()
                                  if n == name and not k.retiring)
                if not versions:
                    raise NotFound(f"no adapter named {name!r} is kept by this replica")
                raise NotFound(f"adapter {name}@v{version} is not kept; kept versions: {versions}")
        elif target == "active" and self.active is not None:
            kept = self._kept[self.active]
        else:
            kept = None
        if kept is None:
            return Lease(None, None, epoch=self.weights_epoch)
        kept.in_flight += 1
        handle = kept.handle if self.mode == "lora" else None
        lease = Lease(handle, kept.key, kept, epoch=self.weights_epoch)
        if waited_for is not None:  # no await since the wait: the push sees this at once
            waited_for.unsent += 1
            lease.waited_for, lease.unsent = waited_for, requests
        return lease

    @property
    def switching(self) -> bool:
        """merged mode: a switch is draining pinned requests or rewriting the weights."""
        return not self._open.is_set()

    def finished_by(self, lease: Lease) -> tuple[tuple[str, int] | None, bool]:
        """(the version serving now, whether the weights changed since the lease was taken).
        Call it as the request's last tokens arrive."""
        return self.active, self.weights_epoch != lease.epoch

    async def release(self, lease: Lease) -> None:
        lease.let_go()  # ended before all its engine requests were submitted (an error)
        if lease.kept is not None:
            lease.kept.in_flight -= 1
        if lease.pinned:
            self._pinned_in_flight -= 1
        async with self._idle:
            self._idle.notify_all()
        if lease.kept is not None and lease.kept.retiring and lease.kept.in_flight == 0:
            await self._unload(lease.kept)

    @contextlib.asynccontextmanager
    async def lease(self, target: str, pinned: tuple[str, int] | None = None,
                    requests: int = 1):
        held = await self.acquire(target, pinned, requests)
        try:
            yield held
        finally:
            await self.release(held)

    # ------------------------------------------------------------------ changes

    def name_lock(self, name: str) -> asyncio.Lock:
        return self._name_locks.setdefault(name, asyncio.Lock())

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

    async def install(self, staged: Path, meta: dict, activate: bool) -> tuple[Kept, float]:
        """Moves a verified upload into place, loads it and (optionally) activates it.
        Caller holds name_lock(meta["name"]). Returns the kept entry and seconds to servable."""
        name, version = meta["name"], int(meta["version"])
        await self._make_room()
        final = self.dir_for(name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a retired leftover of the same version number
            shutil.rmtree(final)
        (staged / META_FILE).write_text(json.dumps(meta, indent=1))
        os.replace(staged, final)
        kept = self._kept_from_meta(meta, final)
        start = time.perf_counter()
        incoming = Incoming()
        hold = self.mode == "lora" and activate
        if hold:
            self._incoming.add(incoming)
        try:
            # lora mode: the engine is paused from the end of its current step until the
            # requests that waited for this version are in (see acquire): they then run in
            # the step right after the load, not the one after that.
            async with self.engine.paused() if hold else contextlib.nullcontext():
                if self.mode == "lora":
                    try:
                        await self.engine.add_adapter(kept.handle)
                    except Exception:
                        shutil.rmtree(final, ignore_errors=True)
                        raise
                self._kept[kept.key] = kept
                self._newest[name] = max(self._newest.get(name, 0), version)
                if activate:
                    await self._switch(kept.key)
                else:
                    self._save_state()
                if hold:
                    self._let_in(incoming)
                    # A request slower than this to reach the engine (its client slow to take
                    # a stream's first message, say) joins a later step; nobody waits longer.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(incoming.all_sent(), HOLD_SEND_SECONDS)
        finally:
            # Active now, or refused: either way the requests waiting on it go in.
            self._let_in(incoming)
        seconds = time.perf_counter() - start
        await self._retire_old(name)
        self._refresh_gauges()
        return kept, seconds

    def _let_in(self, incoming: Incoming) -> None:
        self._incoming.discard(incoming)
        incoming.done.set()

    async def set_active(self, key: tuple[str, int] | None) -> tuple:
        """key None = base model. Returns (previous, now)."""
        if key is not None:
            if key[1] == 0:
                versions = [v for (n, v), k in self._kept.items() if n == key[0] and not k.retiring]
                if not versions:
                    raise NotFound(f"no adapter named {key[0]!r} is kept by this replica")
                key = (key[0], max(versions))
            kept = self._kept.get(key)
            if kept is None or kept.retiring:
                raise NotFound(f"adapter {_fmt(key)} is not kept by this replica")
        previous = self.active
        await self._switch(key)
        if previous is not None:
            await self._retire_old(previous[0])
        self._refresh_gauges()
        return previous, self.active

    async def _switch(self, key: tuple[str, int] | None) -> None:
        async with self._switch_lock:
            if key == self.active:
                self._save_state()
                return
            if self.mode == "merged":
                self._open.clear()
                try:
                    async with self._idle:
                        await self._idle.wait_for(lambda: self._pinned_in_flight == 0)
                    path = self._kept[key].handle.path if key else None
                    # The label changes before the engine steps again: a request whose last
                    # token comes from the new weights must see the new epoch (finished_by),
                    # whatever order the event loop wakes the two up in.
                    async with self.engine.paused():
                        await self.engine.load_merged(path)
                        self.active = key
                        self.weights_epoch += 1
                finally:
                    self._open.set()
            else:
                self.active = key
            self._save_state()
            log.info("active adapter is now %s", _fmt(self.active))

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

    async def _unload(self, kept: Kept) -> None:
        if self._kept.get(kept.key) is not kept:
            return
        del self._kept[kept.key]
        if self.mode == "lora":
            try:
                await self.engine.remove_adapter(kept.handle)
            except Exception:  # noqa: BLE001 - a failed unload must not fail the request
                log.exception("could not unload %s", kept.handle.engine_name)
        shutil.rmtree(kept.handle.path, ignore_errors=True)
        log.info("unloaded adapter %s", kept.handle.engine_name)
        self._refresh_gauges()

    async def _make_room(self) -> None:
        """Before loading one more version: past max_loaded, unload the least recently loaded
        idle version that is not active (whatever its name); refuse only when every loaded
        version is active or still running requests."""
        if self.mode != "lora":
            return
        while len(self._kept) >= self.max_loaded:
            idle = sorted(
                (k for k in self._kept.values() if k.key != self.active and k.in_flight == 0),
                key=lambda k: k.loaded_at,
            )
            if not idle:
                busy = sum(1 for k in self._kept.values() if k.in_flight)
                raise ResourceExhausted(
                    f"{len(self._kept)} adapter versions are loaded (limit max_loaded_adapters="
                    f"{self.max_loaded}) and {busy} of them are serving requests; retry shortly"
                )
            log.info("unloading %s to make room (max_loaded_adapters=%d)",
                     idle[0].handle.engine_name, self.max_loaded)
            await self._unload(idle[0])

    # ------------------------------------------------------------------ views

    def kept(self) -> list[Kept]:
        return sorted((k for k in self._kept.values() if not k.retiring), key=lambda k: k.key)

    def _refresh_gauges(self) -> None:
        self.stats.loaded_adapters.set(len(self._kept))
        names = {n for n, _ in self._kept} | set(self._newest)
        for name in names:
            version = self.active[1] if self.active and self.active[0] == name else 0
            self.stats.active_version.labels(name).set(version)


def _fmt(key: tuple[str, int] | None) -> str:
    return "the base model" if key is None else f"{key[0]}@v{key[1]}"
