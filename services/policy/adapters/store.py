"""PushAdapter's workflow: a pushed adapter version from the first message to servable.

One push per adapter name at a time (a lock per name). The header is checked before any byte is
stored (checks.py); the bytes stream into a staging folder under `<adapters>/.incoming/` with a
running hash and a size bound; the weights are checked against the base model; the folder is
installed as `<adapters>/<name>/v<version>/` in one rename (rlhf.files.atomic_dir) and handed to
the registry, which loads and (unless skip_activate) activates it. A push with stage_seconds
stages its version instead (registry.stage: servable when pinned, dropped unless activated in
time). A refused or failed push leaves nothing behind (no staging folder, no version folder) and
the active version serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from rlhf.files import atomic_dir
from rlhf.formats import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from rlhf.plumbing.errors import InvalidArgument, ServiceError
from rlhf.v1 import policy_pb2
from services.policy.adapters.checks import BaseShapes, PushLimits, check_header, check_weights
from services.policy.adapters.registry import META_FILE, AdapterRegistry, Kept
from services.policy.stats import EngineStats

log = logging.getLogger("rlhf.policy.adapters")

MAX_CHUNK = 4 * 1024 * 1024
STAGING = ".incoming"
MAX_STAGE_SECONDS = 86400


@dataclass
class PushResult:
    kept: Kept
    activated: bool
    load_seconds: float  # upload end to servable; 0 for an identical re-push


class AdapterStore:
    def __init__(self, registry: AdapterRegistry, limits: PushLimits, shapes: BaseShapes,
                 stats: EngineStats):
        self.registry = registry
        self.limits = limits
        self.shapes = shapes
        self.stats = stats
        self.staging = registry.root / STAGING
        self._name_locks: dict[str, asyncio.Lock] = {}

    def clear_staging(self) -> None:
        """Start-up: uploads a previous process did not finish, and interrupted installs."""
        shutil.rmtree(self.staging, ignore_errors=True)
        for leftover in self.registry.root.glob("*/.v*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def name_lock(self, name: str) -> asyncio.Lock:
        return self._name_locks.setdefault(name, asyncio.Lock())

    async def push(self, messages: AsyncIterator[policy_pb2.PushAdapterRequest]) -> PushResult:
        """Runs one push; its outcome is counted in rlhf_policy_adapter_loads_total{result}."""
        try:
            result = await self._push(messages)
        except ServiceError:
            self.stats.adapter_loads.labels("refused").inc()
            raise
        except Exception:
            self.stats.adapter_loads.labels("failed").inc()
            raise
        self.stats.adapter_loads.labels("ok").inc()
        self.stats.adapter_load_seconds.observe(result.load_seconds)
        return result

    async def _push(self, messages) -> PushResult:
        stream = messages.__aiter__()
        try:
            return await self._checked_push(stream)
        except ServiceError:
            # A client still sending when the call ends may see its next write fail, and
            # grpc.aio clients then report INTERNAL instead of this refusal (grpc/grpc#36066):
            # take in the rest of what it sends (bounded) so it gets the reason.
            await _drain(stream, self.limits.max_bytes + MAX_CHUNK)
            raise

    async def _checked_push(self, stream) -> PushResult:
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("empty push: send the header first, then data") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message of a push must be the header")
        header = first.header
        peft = check_header(header, self.limits, self.shapes)
        if header.stage_seconds > MAX_STAGE_SECONDS:
            raise InvalidArgument(f"stage_seconds {header.stage_seconds} is above "
                                  f"{MAX_STAGE_SECONDS}")
        stage = header.stage_seconds > 0
        activate = not (header.skip_activate or stage)
        name = header.adapter.name
        registry = self.registry
        async with self.name_lock(name):
            version = header.adapter.version or registry.next_version(name)
            same = registry.check_new_version(name, version, header.sha256)
            if same is not None:  # an identical re-push: nothing to store
                activated = activate and registry.active != same.key
                if activated:
                    await registry.set_active(same.key)
                elif stage and registry.staged_until(same.key) is not None:
                    registry.stage(same.key, header.stage_seconds)  # a new deadline
                return PushResult(same, activated, 0.0)
            staged = self.staging / uuid.uuid4().hex
            try:
                size = await self._receive(header, stream, staged)
                self.stats.pushed_bytes.inc(size)
                # Reads every tensor: off the event loop, which keeps serving meanwhile.
                await asyncio.to_thread(check_weights, staged, self.shapes, self.limits.max_rank,
                                        self.limits.max_abs_value)
                targets = peft["target_modules"]
                meta = {
                    "name": name, "version": version, "sha256": header.sha256,
                    "size_bytes": size, "rank": peft["r"],
                    "target_modules": sorted(targets),
                    "base_model_id": header.base_model_id, "loaded_at": time.time(),
                }
                folder = self._install(staged, registry.dir_for(name, version), meta)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            kept, seconds = await registry.add(meta, folder, activate=activate)
            if stage:
                registry.stage(kept.key, header.stage_seconds)
        log.info("adapter %s@v%d loaded in %.3fs%s", name, version, seconds,
                 " and active" if activate else
                 f", staged for {header.stage_seconds}s" if stage else "")
        return PushResult(kept, activate, seconds)

    async def _receive(self, header: policy_pb2.AdapterHeader, chunks, folder: Path) -> int:
        """Streams the data chunks into folder (weights) and writes the peft config beside
        them; returns the bytes received. The caller removes the folder whatever happens."""
        folder.mkdir(parents=True)
        digest = hashlib.sha256()
        size = 0
        with open(folder / ADAPTER_WEIGHTS_FILE, "wb") as out:
            async for msg in chunks:
                if msg.WhichOneof("part") != "data":
                    raise InvalidArgument("only the first message may be a header; then data")
                if len(msg.data) > MAX_CHUNK:
                    raise InvalidArgument(f"a data chunk is larger than {MAX_CHUNK} bytes")
                size += len(msg.data)
                if size > header.size_bytes:
                    raise InvalidArgument(
                        f"received more than the {header.size_bytes} bytes the header announced"
                    )
                digest.update(msg.data)
                out.write(msg.data)
        if size < header.size_bytes:
            raise InvalidArgument(
                f"stream ended after {size} of {header.size_bytes} bytes (truncated upload)"
            )
        if digest.hexdigest() != header.sha256:
            raise InvalidArgument(
                f"sha256 mismatch: header says {header.sha256}, data hashes to "
                f"{digest.hexdigest()}"
            )
        (folder / ADAPTER_CONFIG_FILE).write_text(header.peft_config_json)
        return size

    @staticmethod
    def _install(staged: Path, final: Path, meta: dict) -> Path:
        """Moves the checked files into `final` in one rename, with the record of the checks
        (META_FILE) that a restart reads back."""
        with atomic_dir(final) as tmp:
            for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE):
                os.replace(staged / name, tmp / name)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        return final


async def _drain(stream, limit: int) -> None:
    """Reads what is left of a request stream, up to `limit` bytes of messages."""
    taken = 0
    with contextlib.suppress(Exception):
        async for msg in stream:
            taken += msg.ByteSize()
            if taken > limit:
                return
