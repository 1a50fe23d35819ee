"""merged adapter mode: only the active version is servable; it is merged into the base weights in
place, so it runs at base speed. Requests for the base model or another version are refused.

A switch rewrites the weights under running requests. Requests pinned to the old version asked
for exactly those weights, so the switch waits for them, and new pinned requests wait for the
switch, but at most `switch_timeout` seconds: then the switch aborts them (ABORTED, saying why)
and goes on, so nobody can hold a push or a rollback back. Requests that follow the active
version go in at once (under the old version's label) and go on with the new weights; their
responses name both versions (`finished_by`), so a label never hides a change.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from rlhf.plumbing.errors import Aborted, FailedPrecondition
from rlhf.plumbing.limits import abort_call
from services.policy.adapters.registry import AdapterRegistry, Kept, Key, Lease, fmt
from services.policy.engine import Engine
from services.policy.stats import EngineStats

log = logging.getLogger("rlhf.policy.adapters")


class MergedAdapters(AdapterRegistry):
    mode = "merged"

    def __init__(self, root: Path, engine: Engine, keep_versions: int, stats: EngineStats,
                 switch_timeout: float = 30.0):
        super().__init__(root, engine, keep_versions, stats)
        self.switch_timeout = switch_timeout
        self._pinned: dict[int, Lease] = {}  # id -> lease
        # Cleared while the served weights change; pinned requests wait on it.
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Condition()

    @property
    def switching(self) -> bool:
        """A switch is draining pinned requests or rewriting the weights."""
        return not self._open.is_set()

    async def acquire(self, target: str, pinned: Key | None = None, requests: int = 1) -> Lease:
        if target != "active":
            # Pinned requests run on one version from start to end, so they wait out a switch;
            # new ones must not hold back the drain the switch waits for. Requests that follow
            # the active version go in at once: under the old version's label, and the switch
            # moves them like the running ones (finished_by says so). One that reaches the
            # paused engine is computed wholly on the new weights in the first step after it.
            await self._open.wait()
        if target == "base" or (target == "pinned" and pinned != self.active):
            what = "the base model" if target == "base" else fmt(pinned)
            raise FailedPrecondition(
                f"this replica runs in merged adapter mode and serves only the active "
                f"version ({fmt(self.active)}), not {what}; use a replica in lora mode"
            )
        kept = self._kept[self.active] if self.active is not None else None
        lease = self._new_lease(kept, None, pinned=target == "pinned")
        if lease.pinned:
            lease.task = asyncio.current_task()
            self._pinned[id(lease)] = lease
        return lease

    async def release(self, lease: Lease) -> None:
        if lease.pinned:
            self._pinned.pop(id(lease), None)
            async with self._idle:
                self._idle.notify_all()
        await super().release(lease)

    async def _load(self, kept: Kept, activate: bool) -> None:
        # Nothing to load until it becomes active: the switch merges it.
        await self._keep(kept, activate)

    async def _change_active(self, key: Key | None) -> None:
        self._open.clear()
        try:
            if not await self._pinned_gone():
                self._abort_pinned(key)
                if not await self._pinned_gone():
                    log.error("%d pinned request(s) did not end when aborted; switching anyway",
                              len(self._pinned))
            path = self._kept[key].handle.path if key else None
            # The label changes before the engine steps again: a request whose last token comes
            # from the new weights must see the new epoch (finished_by), whatever order the
            # event loop wakes the two up in.
            async with self.engine.paused():
                await self.engine.load_merged(path)
                self.active = key
                self.weights_epoch += 1
        finally:
            self._open.set()

    async def _pinned_gone(self) -> bool:
        """Waits up to switch_timeout for the pinned requests to end; whether they all did."""
        try:
            async with asyncio.timeout(self.switch_timeout), self._idle:
                await self._idle.wait_for(lambda: not self._pinned)
        except TimeoutError:
            return False
        return True

    def _abort_pinned(self, key: Key | None) -> None:
        log.warning("aborting %d request(s) pinned to %s: the switch to %s waited %g s "
                    "(switch_timeout_seconds)", len(self._pinned), fmt(self.active), fmt(key),
                    self.switch_timeout)
        for lease in list(self._pinned.values()):
            abort_call(lease.task, Aborted(
                f"this request, pinned to {fmt(lease.served)}, was aborted: the replica switches "
                f"to {fmt(key)} and waits at most {self.switch_timeout:g} s for pinned requests "
                "(switch_timeout_seconds); retry, pinning the version now active"
            ))

    async def _make_room(self) -> None:
        pass  # only the active version is in the engine, inside the weights

    async def _restore_version(self, kept: Kept) -> None:
        pass  # kept on disk; merged when it becomes active

    async def _restore_active(self, kept: Kept) -> None:
        await self.engine.load_merged(kept.handle.path)

    async def _unload_from_engine(self, kept: Kept) -> None:
        pass  # a version leaves only when inactive, and then it is not in the weights
