"""lora-mode registry book-keeping (unit level, a recording engine stands in for vLLM): versions
in use are unloaded only after their last request, room is made least-recently-loaded first,
pushes of one name are serialised. The real-engine behaviour is in test_adapters.py."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from rlhf.plumbing.errors import NotFound, ResourceExhausted
from services.policy.adapters.checks import BaseShapes, PushLimits
from services.policy.adapters.lora import LoraAdapters
from services.policy.adapters.registry import META_FILE
from services.policy.adapters.store import AdapterStore
from services.policy.stats import EngineStats


class RecordingEngine:
    def __init__(self):
        self.loaded: set[str] = set()
        self.events: list[str] = []

    async def add_adapter(self, handle):
        self.loaded.add(handle.engine_name)
        self.events.append(f"+{handle.engine_name}")

    async def remove_adapter(self, handle):
        self.loaded.discard(handle.engine_name)
        self.events.append(f"-{handle.engine_name}")

    @contextlib.asynccontextmanager
    async def paused(self):
        self.events.append("pause")
        try:
            yield
        finally:
            self.events.append("resume")


def _stage(registry: LoraAdapters, meta: dict):
    """A version's folder as the store installs it."""
    folder = registry.dir_for(meta["name"], meta["version"])
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    (folder / "adapter_config.json").write_text("{}")
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def _meta(name, version):
    return {"name": name, "version": version, "sha256": f"{version:064x}", "size_bytes": 1,
            "rank": 8, "target_modules": ["q_proj"], "loaded_at": float(version)}


async def _install(registry, name, version, activate=True):
    meta = _meta(name, version)
    return await registry.add(meta, _stage(registry, meta), activate)


def _lora(root, engine):
    return LoraAdapters(root, engine, keep_versions=2, stats=EngineStats(), max_loaded=4)


@pytest.fixture
def registry(tmp_path):
    return _lora(tmp_path / "adapters", RecordingEngine())


async def test_version_in_use_is_unloaded_only_after_its_last_request(registry):
    await _install(registry, "p", 1)
    lease = await registry.acquire("active")
    assert lease.served == ("p", 1)
    await _install(registry, "p", 2)
    await _install(registry, "p", 3)  # keep_versions=2: v1 retires, but a request holds it
    assert "p@v1" in registry.engine.loaded
    assert [k.handle.version for k in registry.kept()] == [2, 3]
    with pytest.raises(NotFound):  # retiring versions take no new requests
        await registry.acquire("pinned", ("p", 1))
    await registry.release(lease)
    assert "p@v1" not in registry.engine.loaded
    assert not (registry.root / "p" / "v1").exists()


async def test_room_is_made_least_recently_loaded_first(registry):
    for name in ("a", "b", "c", "d"):
        await _install(registry, name, 1, activate=False)
    await _install(registry, "e", 1)  # 4 loaded = max_loaded: "a" (oldest, idle) goes
    assert "a@v1" not in registry.engine.loaded and "e@v1" in registry.engine.loaded
    held = [await registry.acquire("pinned", (n, 1)) for n in ("b", "c", "d")]
    with pytest.raises(ResourceExhausted, match="max_loaded_adapters=4"):
        await _install(registry, "f", 1)  # everything else is active or busy
    for lease in held:
        await registry.release(lease)
    await _install(registry, "f", 1)
    assert "b@v1" not in registry.engine.loaded


async def test_state_survives_a_new_registry(registry, tmp_path):
    await _install(registry, "p", 1)
    await _install(registry, "p", 2)
    await registry.set_active(("p", 1))
    state = json.loads((registry.root / "state.json").read_text())
    assert state["active"] == {"name": "p", "version": 1}
    again = _lora(registry.root, RecordingEngine())
    await again.restore()
    assert again.active == ("p", 1)
    assert again.engine.loaded == {"p@v1", "p@v2"}
    assert again.next_version("p") == 3


async def test_pushes_of_one_name_are_serialised(registry):
    store = AdapterStore(registry, PushLimits("tiny", 16, 1024), BaseShapes({}), EngineStats())
    order = []

    async def push(version):
        async with store.name_lock("p"):
            order.append(("start", version))
            await asyncio.sleep(0.05)
            await _install(registry, "p", version)
            order.append(("end", version))

    await asyncio.gather(push(1), push(2))
    assert order == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]


class GatedEngine(RecordingEngine):
    """Holds each add_adapter until the test opens the gate; fails it when told to."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.adding = asyncio.Event()
        self.fail = False

    async def add_adapter(self, handle):
        self.adding.set()
        await self.gate.wait()
        if self.fail:
            raise RuntimeError(f"engine refused {handle.engine_name}")
        await super().add_adapter(handle)


@pytest.fixture
def gated(tmp_path):
    return _lora(tmp_path / "adapters", GatedEngine())


async def _push_v2_held_in_the_engine(gated, activate=True, fail=False):
    """p@v1 active, then a push of p@v2 that the engine holds in add_adapter (and then refuses,
    if fail); returns its task and a request that follows the active version, started while v2
    loads."""
    engine = gated.engine
    engine.gate.set()
    await _install(gated, "p", 1)
    engine.gate.clear()
    engine.fail = fail
    push = asyncio.create_task(_install(gated, "p", 2, activate=activate))
    await engine.adding.wait()
    return push, asyncio.create_task(gated.acquire("active"))


async def test_requests_that_follow_the_active_version_wait_for_one_being_loaded(gated):
    push, follower = await _push_v2_held_in_the_engine(gated)
    # Pinned and base requests don't wait: they name their model.
    pinned = await asyncio.wait_for(gated.acquire("pinned", ("p", 1)), 1)
    on_base = await asyncio.wait_for(gated.acquire("base"), 1)
    assert (pinned.served, on_base.served) == (("p", 1), None)
    await asyncio.sleep(0.05)
    assert not follower.done()  # it would start on v1, which the push is replacing
    gated.engine.gate.set()
    await push
    lease = await asyncio.wait_for(follower, 1)
    assert lease.served == ("p", 2) and lease.handle.engine_name == "p@v2"
    for held in (pinned, on_base, lease):
        await gated.release(held)


async def test_a_version_the_engine_refuses_lets_waiting_requests_go_on_the_old_one(gated):
    push, follower = await _push_v2_held_in_the_engine(gated, fail=True)
    await asyncio.sleep(0.05)
    assert not follower.done()
    gated.engine.gate.set()
    with pytest.raises(RuntimeError, match="refused p@v2"):
        await push
    lease = await asyncio.wait_for(follower, 1)
    assert lease.served == ("p", 1)
    await gated.release(lease)


async def test_a_push_that_does_not_activate_holds_nobody_back(gated):
    push, follower = await _push_v2_held_in_the_engine(gated, activate=False)
    lease = await asyncio.wait_for(follower, 1)
    assert lease.served == ("p", 1)
    gated.engine.gate.set()
    await push
    await gated.release(lease)
    assert gated.active == ("p", 1)


async def test_a_push_resumes_the_engine_once_the_requests_that_waited_are_submitted(gated):
    """The engine stays paused after the load until every engine request of the leases that
    waited for the version is submitted, so they run in the first step after the load."""
    push, follower = await _push_v2_held_in_the_engine(gated)
    other = asyncio.create_task(gated.acquire("active", requests=2))  # a 2-prompt Generate
    await asyncio.sleep(0.01)
    gated.engine.gate.set()
    leases = [await asyncio.wait_for(task, 1) for task in (follower, other)]
    assert [lease.served for lease in leases] == [("p", 2), ("p", 2)]
    await asyncio.sleep(0.02)
    events = gated.engine.events
    assert events[-2:] == ["pause", "+p@v2"] and not push.done()
    leases[0].submitted()
    leases[1].submitted()
    await asyncio.sleep(0.02)
    assert events[-1] == "+p@v2"  # one engine request of the 2-prompt lease is still to come
    leases[1].submitted()
    await asyncio.wait_for(push, 1)
    assert events[-3:] == ["pause", "+p@v2", "resume"]
    for lease in leases:
        await gated.release(lease)


async def test_a_request_that_waited_and_ends_unsubmitted_does_not_keep_the_engine_paused(
        gated):
    push, follower = await _push_v2_held_in_the_engine(gated)
    gated.engine.gate.set()
    lease = await asyncio.wait_for(follower, 1)
    await gated.release(lease)  # it failed before reaching the engine (a cancelled call)
    await asyncio.wait_for(push, 1)
    assert gated.engine.events[-1] == "resume"


async def test_a_push_waits_only_so_long_for_a_slow_request(gated, monkeypatch):
    monkeypatch.setattr("services.policy.adapters.lora.HOLD_SEND_SECONDS", 0.05)
    push, follower = await _push_v2_held_in_the_engine(gated)
    gated.engine.gate.set()
    lease = await asyncio.wait_for(follower, 1)
    await asyncio.wait_for(push, 1)  # never submitted: the engine goes on without it
    assert gated.engine.events[-1] == "resume"
    await gated.release(lease)


async def test_a_refused_version_resumes_the_engine(gated):
    push, follower = await _push_v2_held_in_the_engine(gated, fail=True)
    gated.engine.gate.set()
    with pytest.raises(RuntimeError):
        await push
    assert gated.engine.events[-2:] == ["pause", "resume"]
    await gated.release(await follower)
