"""The versioned reward model, scorer `rm:@active`: the pushed version that is active now, and
how versions are pushed, activated (a rollback is an activation) and listed.

A new version is checked before it can serve: it loads as a reward model, its tokenizer fits its
embeddings, a LoRA version names an allowed base (`rm_allowed_bases`), and a probe pair scores
to finite numbers. A refused push leaves the active version serving and nothing on disk.

A switch is one assignment: each Score call takes the version active when it starts and keeps it
to the end (all its items are scored by one version, which the response names), so no call fails
because of a switch. The previous version's model is released once its last call ends.

At start-up the stored active version is loaded; with none stored, `rm_initial` (a local folder)
is stored as version `rm_initial_version` and activated. A stored version that no longer loads is
set aside and the newest one that loads serves instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.formats import ADAPTER_CONFIG_FILE
from rlhf.plumbing.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from rlhf.v1 import reward_pb2
from services.reward.config import RewardConfig
from services.reward.items import Item
from services.reward.metrics import RewardStats
from services.reward.rm_store import MAX_CHUNK, RewardModelStore, Version, check_header
from services.reward.scorers import Scorer
from services.reward.spec import ScorerSpec

log = logging.getLogger("rlhf.reward.versions")

ACTIVE_ARG = "@active"
PROBE = [Item("Yes, I can help with that.", prompt="Can you help me?"),
         Item("No.", prompt="Can you help me?")]


def check_candidate(folder: Path, config: RewardConfig):
    """Loads `folder` as a reward model and checks it can serve; returns the loaded
    RewardModel or raises FailedPrecondition saying why not."""
    from services.reward.rm import RewardModel

    adapter = folder / ADAPTER_CONFIG_FILE
    if adapter.exists():
        try:
            base = str(json.loads(adapter.read_text()).get("base_model_name_or_path") or "")
        except (ValueError, OSError, AttributeError) as exc:
            raise FailedPrecondition(f"its {ADAPTER_CONFIG_FILE} is unreadable: {exc}") from None
        allowed = {str(Path(b).expanduser().resolve()) for b in config.rm_allowed_bases}
        if not base or str(Path(base).expanduser().resolve()) not in allowed:
            raise FailedPrecondition(
                f"it is a LoRA adapter over {base!r}, which is not an allowed base "
                "(rm_allowed_bases); push a merged model (`rlhf train rm --merge`)")
    model = RewardModel(folder, config.device, config.dtype, config.rm_max_tokens,
                        config.rm_batch_tokens)
    model.load()
    embeddings = model.model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(model.tokenizer) > rows:
        raise FailedPrecondition(
            f"its tokenizer has {len(model.tokenizer)} tokens and the model embeds {rows}: "
            "they do not belong together")
    try:
        probe = model.score(PROBE)
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, refuse the version
        raise FailedPrecondition(f"it fails on a probe pair: {type(exc).__name__}: {exc}") \
            from None
    if len(probe) != len(PROBE) or not all(math.isfinite(x) for x in probe):
        raise FailedPrecondition(f"it scores a probe pair to {probe}, not finite numbers")
    return model


@dataclass(eq=False)
class Serving:
    """A loaded version and the calls running on it."""

    version: str
    model: object
    batcher: object
    in_flight: int = 0
    retired: bool = False


class VersionedScorer(Scorer):
    kind = "rm"

    def __init__(self, spec: ScorerSpec, config: RewardConfig, stats: RewardStats):
        super().__init__(spec)
        self.config = config
        self.stats = stats
        self.store = RewardModelStore(config.rm_store_dir(), config.max_rm_push_bytes)
        self.serving: Serving | None = None
        self._lock = asyncio.Lock()  # one push or switch at a time
        self._closing: set[asyncio.Task] = set()
        self._draining: set[Serving] = set()  # replaced versions with calls still running

    # ------------------------------------------------------------------ scoring

    async def run(self, items: list[Item]) -> tuple[list[float], str]:
        serving = self.serving
        if serving is None:
            raise FailedPrecondition(
                "no reward-model version is active: push one (PushRewardModel) or start the "
                "service with --rm-initial FOLDER")
        serving.in_flight += 1
        try:
            return await serving.batcher.submit(items), serving.version
        finally:
            serving.in_flight -= 1
            if serving.retired and serving.in_flight == 0 and serving in self._draining:
                self._draining.discard(serving)
                self._close_later(serving)

    async def score(self, items: list[Item]) -> list[float]:
        return (await self.run(items))[0]

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        store = self.store
        await asyncio.to_thread(store.restore)
        cfg = self.config
        if store.active is None and cfg.rm_initial is not None:
            name = cfg.rm_initial_version
            if name not in store.versions:
                await asyncio.to_thread(store.import_folder, cfg.rm_initial, name)
                log.info("stored %s as reward-model version %s", cfg.rm_initial, name)
            store.active = name
        wanted = store.active
        candidates = [wanted] if wanted else []
        candidates += [v.name for v in reversed(store.kept()) if v.name != wanted]
        for name in candidates:
            try:
                model = await asyncio.to_thread(check_candidate, store.versions[name].folder,
                                                cfg)
            except ServiceError as exc:
                store.set_aside_version(name, exc.message)
                continue
            if name != wanted:
                log.warning("serving reward-model version %s: the active one (%s) is not "
                            "usable", name, wanted or "none recorded")
            await self._serve(name, model)
            break
        if self.serving is None:
            store.active = None
            log.warning("rm:@active has no version to serve: Score calls fail until one is "
                        "pushed")
        await asyncio.to_thread(store.save_state)
        self._refresh_gauges()

    async def close(self) -> None:
        serving, self.serving = self.serving, None
        old, self._draining = list(self._draining), set()
        for each in [s for s in (serving, *old) if s is not None]:
            await each.batcher.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _close_later(self, serving: Serving) -> None:
        task = asyncio.get_running_loop().create_task(serving.batcher.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _serve(self, name: str, model) -> str | None:
        """Makes a loaded model the active version; returns the previous version's name."""
        from services.reward.batcher import MicroBatcher

        cfg = self.config
        batcher = MicroBatcher(model.score, cfg.max_batch_size, cfg.max_wait_ms / 1000.0,
                               on_batch=self.stats.batch_observer(self.name), name="rm")
        previous, self.serving = self.serving, Serving(name, model, batcher)
        self.store.active = name
        if previous is not None:
            previous.retired = True
            if previous.in_flight == 0:
                self._close_later(previous)
            else:
                self._draining.add(previous)
        log.info("active reward-model version is now %s", name)
        return previous.version if previous is not None else None

    # ------------------------------------------------------------------ admin calls

    async def push(self, messages) -> reward_pb2.PushRewardModelResponse:
        stream = messages.__aiter__()
        try:
            response = await self._push(stream)
        except ServiceError:
            self.stats.rm_pushes.labels("refused").inc()
            await _drain(stream, self.config.max_rm_push_bytes + MAX_CHUNK)
            raise
        except Exception:
            self.stats.rm_pushes.labels("failed").inc()
            raise
        self.stats.rm_pushes.labels("ok").inc()
        return response

    async def _push(self, stream) -> reward_pb2.PushRewardModelResponse:
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("empty push: send the header first, then data") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message of a push must be the header")
        header = first.header
        check_header(header, self.store.max_bytes)
        store = self.store
        async with self._lock:
            kept = store.versions.get(header.version)
            if kept is not None:
                if kept.sha256 != header.sha256:
                    raise AlreadyExists(
                        f"reward-model version {header.version} is already kept with different "
                        "content; push it under a new name")
                activated = False
                if not header.skip_activate and store.active != kept.name:
                    await self._activate(kept.name)
                    activated = True
                return reward_pb2.PushRewardModelResponse(
                    model=kept.info(store.active == kept.name), activated=activated)
            staged = await store.receive(header, stream)
            start = time.perf_counter()
            try:
                model = await asyncio.to_thread(check_candidate, staged, self.config)
            except ServiceError as exc:
                shutil.rmtree(staged, ignore_errors=True)
                raise FailedPrecondition(
                    f"reward-model version {header.version} refused: {exc.message}") from None
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            version = await asyncio.to_thread(store.install, staged, header)
            if not header.skip_activate:
                await self._serve(version.name, model)
            del model  # a version kept but not activated is loaded again when activated
            await asyncio.to_thread(store.save_state)
            self._retire_old()
            seconds = time.perf_counter() - start
        log.info("reward-model version %s pushed (%d bytes)%s", version.name,
                 version.size_bytes, "" if header.skip_activate else " and active")
        return reward_pb2.PushRewardModelResponse(
            model=version.info(store.active == version.name),
            activated=not header.skip_activate, load_seconds=seconds)

    async def set_active(self, name: str) -> reward_pb2.SetActiveRewardModelResponse:
        if not name:
            raise InvalidArgument("version is empty: name a kept reward-model version")
        async with self._lock:
            previous = self.store.active
            if name not in self.store.versions:
                kept = ", ".join(v.name for v in self.store.kept()) or "none"
                raise NotFound(f"reward-model version {name!r} is not kept (kept: {kept})")
            if previous != name:
                await self._activate(name)
                await asyncio.to_thread(self.store.save_state)
                self._retire_old()
        return reward_pb2.SetActiveRewardModelResponse(previous=previous or "", active=name)

    async def _activate(self, name: str) -> None:
        version = self.store.versions[name]
        try:
            model = await asyncio.to_thread(check_candidate, version.folder, self.config)
        except ServiceError as exc:
            raise FailedPrecondition(
                f"reward-model version {name} no longer loads: {exc.message}") from None
        await self._serve(name, model)

    def list(self) -> reward_pb2.ListRewardModelsResponse:
        active = self.store.active
        return reward_pb2.ListRewardModelsResponse(
            models=[v.info(v.name == active) for v in self.store.kept()], active=active or "")

    # ------------------------------------------------------------------ views

    def _retire_old(self) -> None:
        for name in self.store.retire_old(self.config.rm_keep_versions):
            log.info("reward-model version %s deleted (beyond rm_keep_versions)", name)
        self._refresh_gauges()

    def _refresh_gauges(self) -> None:
        self.stats.show_rm_versions(
            {v.name: v.heldout_accuracy for v in self.store.kept()}, self.store.active)

    def kept(self) -> list[Version]:
        return self.store.kept()


async def _drain(stream, limit: int) -> None:
    """Reads what is left of a refused push, up to `limit` bytes, so its client sees the
    refusal and not a broken write (grpc/grpc#36066)."""
    taken = 0
    with contextlib.suppress(Exception):
        async for msg in stream:
            taken += msg.ByteSize()
            if taken > limit:
                return
