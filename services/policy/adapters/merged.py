"""merged adapter mode: only the active version is servable; it is merged into the base weights in
place, so it runs at base speed. Requests for the base model or another version are refused.

A switch rewrites the weights under running requests. Requests pinned to the old version asked
for exactly those weights, so the switch waits for them, and new pinned requests wait for the
switch. Requests that follow the active version go in at once (under the old version's label)
and go on with the new weights; their responses name both versions (`finished_by`), so a label
never hides a change.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from rlhf.plumbing.errors import FailedPrecondition
from services.policy.adapters.registry import AdapterRegistry, Kept, Key, Lease, fmt
from services.policy.engine import Engine
from services.policy.stats import EngineStats


class MergedAdapters(AdapterRegistry):
    mode = "merged"

    def __init__(self, root: Path, engine: Engine, keep_versions: int, stats: EngineStats):
        super().__init__(root, engine, keep_versions, stats)
        self._pinned_in_flight = 0
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
        if target == "pinned":
            self._pinned_in_flight += 1
        return self._new_lease(kept, None, pinned=target == "pinned")

    async def release(self, lease: Lease) -> None:
        if lease.pinned:
            self._pinned_in_flight -= 1
            async with self._idle:
                self._idle.notify_all()
        await super().release(lease)

    async def _load(self, kept: Kept, activate: bool) -> None:
        # Nothing to load until it becomes active: the switch merges it.
        await self._keep(kept, activate)

    async def _change_active(self, key: Key | None) -> None:
        self._open.clear()
        try:
            async with self._idle:
                await self._idle.wait_for(lambda: self._pinned_in_flight == 0)
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

    async def _make_room(self) -> None:
        pass  # only the active version is in the engine, inside the weights

    async def _restore_version(self, kept: Kept) -> None:
        pass  # kept on disk; merged when it becomes active

    async def _restore_active(self, kept: Kept) -> None:
        await self.engine.load_merged(kept.handle.path)

    async def _unload_from_engine(self, kept: Kept) -> None:
        pass  # a version leaves only when inactive, and then it is not in the weights
