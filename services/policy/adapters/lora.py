"""lora adapter mode: every kept version is loaded in the engine as a LoRA adapter of its own
and servable at once (the active one, any kept `name@version`, and the base model).

A request runs on the version it was given when it started; a switch moves nobody. A push that
activates its version pauses the engine (from the end of its current step) while the adapter
loads; requests that follow the active version and arrive meanwhile wait for the new version
and go into the engine before it resumes, so they run in the first step after the load. The
engine resumes once they are all submitted, or after HOLD_SEND_SECONDS at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from rlhf.plumbing.errors import ResourceExhausted
from services.policy.adapters.registry import AdapterRegistry, Kept, Key, Lease
from services.policy.engine import Engine
from services.policy.stats import EngineStats

log = logging.getLogger("rlhf.policy.adapters")

# How long a push keeps the engine paused after its load for the requests that waited for it to
# be submitted (normally a few ms; every request stalls meanwhile).
HOLD_SEND_SECONDS = 0.05


class Incoming:
    """A checked version the engine is loading to make active, and the requests that follow the
    active version waiting for it."""

    def __init__(self):
        self.done = asyncio.Event()  # active now, or refused
        self.waiting = 0  # requests waiting on `done`
        self.unsent = 0  # requests it let go whose engine requests aren't all submitted yet
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    def one_sent(self) -> None:
        """A lease that waited for this version has submitted all its engine requests."""
        self.unsent -= 1
        self.changed()

    async def all_sent(self) -> None:
        while self.waiting or self.unsent:
            self._changed.clear()
            await self._changed.wait()


class LoraAdapters(AdapterRegistry):
    mode = "lora"

    def __init__(self, root: Path, engine: Engine, keep_versions: int, stats: EngineStats,
                 max_loaded: int):
        super().__init__(root, engine, keep_versions, stats)
        self.max_loaded = max_loaded
        # Checked versions the engine is loading to make active.
        self._incoming: set[Incoming] = set()

    async def acquire(self, target: str, pinned: Key | None = None, requests: int = 1) -> Lease:
        # Resolved now: a later switch doesn't move the request.
        waited_for = await self._wait_for_incoming() if target == "active" else None
        kept = self._resolve(target, pinned)
        lease = self._new_lease(kept, kept.handle if kept is not None else None)
        if waited_for is not None and kept is not None:
            # No await since the wait: the push sees this lease before it resumes the engine.
            waited_for.unsent += 1
            lease.unsent, lease.all_sent = requests, waited_for.one_sent
        return lease

    async def _wait_for_incoming(self) -> Incoming | None:
        """A checked version is being loaded to become active (the rest of an engine step and
        ~35 ms, with the engine paused). A request started now on the version it replaces would
        produce the new version's first token a step later than one that waits."""
        waited_for = None
        for incoming in list(self._incoming):
            incoming.waiting += 1
            try:
                await incoming.done.wait()
            finally:
                incoming.waiting -= 1
                incoming.changed()
            waited_for = incoming
        return waited_for

    async def _load(self, kept: Kept, activate: bool) -> None:
        if not activate:  # nobody waits for it, the engine loads it between steps
            await self.engine.add_adapter(kept.handle)
            await self._keep(kept, activate=False)
            return
        incoming = Incoming()
        self._incoming.add(incoming)
        try:
            # Paused from the end of the current step until the requests that waited for this
            # version are in: they run in the step right after the load, not the one after it.
            async with self.engine.paused():
                await self.engine.add_adapter(kept.handle)
                await self._keep(kept, activate=True)
                self._let_in(incoming)
                # A request slower than this to reach the engine (its client slow to take a
                # stream's first message, say) joins a later step; nobody waits longer.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(incoming.all_sent(), HOLD_SEND_SECONDS)
        finally:
            # Active now, or refused: either way the requests waiting on it go in.
            self._let_in(incoming)

    def _let_in(self, incoming: Incoming) -> None:
        self._incoming.discard(incoming)
        incoming.done.set()

    async def _change_active(self, key: Key | None) -> None:
        self.active = key  # every kept version is loaded: new requests just get another one

    async def _make_room(self) -> None:
        """Past max_loaded, unloads the least recently loaded idle version that is not active
        (whatever its name); refuses only when every loaded version is active or busy."""
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

    async def _restore_version(self, kept: Kept) -> None:
        await self.engine.add_adapter(kept.handle)

    async def _restore_active(self, kept: Kept) -> None:
        pass  # loaded with the others

    async def _unload_from_engine(self, kept: Kept) -> None:
        try:
            await self.engine.remove_adapter(kept.handle)
        except Exception:  # noqa: BLE001 - a failed unload must not fail the request
            log.exception("could not unload %s", kept.handle.engine_name)
