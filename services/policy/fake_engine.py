"""An Engine without a model, for tests of everything around the engine (request validation,
admission, auth, pushes, leases) over a real gRPC server in a fraction of a second.

Its tokens are deterministic: a function of the prompt, the sample index, the position, the seed
and what serves the request (the base weights, an adapter, or the merged weights), so a test can
tell who produced an answer. It records the adapters added and removed and the weights merged,
can be told to refuse the next adapter load, to take `token_delay` seconds per token, and to
die. `paused()` really holds token production, as the Engine protocol says.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from rlhf.plumbing.errors import InvalidArgument
from services.policy.engine import (
    AdapterHandle,
    CompletionDelta,
    EngineDead,
    EngineOutput,
    Sampling,
)


class FakeEngine:
    def __init__(self, vocab_size: int = 1000, max_model_len: int = 512, dtype: str = "float32",
                 token_delay: float = 0.0):
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.version = "fake 1.0"
        self.token_delay = token_delay  # seconds per generated token
        self.running = False
        self.entered = 0
        self.exited = 0
        self.added: list[str] = []  # engine names ("name@vN") in load order
        self.removed: list[str] = []
        self.merged: list[Path | None] = []  # merged mode: every load_merged, None = base
        self.fail_next_load: str | None = None  # refuse the next add_adapter with this reason
        self._dead: str | None = None
        self._loaded: dict[int, str] = {}  # engine id -> engine name
        self._weights: Path | None = None
        self._pauses = 0
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._pending = 0

    # ------------------------------------------------------------------ lifecycle and health

    async def __aenter__(self) -> FakeEngine:
        self.entered += 1
        self.running = True
        self._dead = None
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.running = False
        self.exited += 1

    def die(self, reason: str = "told to die") -> None:
        self._dead = reason

    async def check_health(self) -> None:
        if not self.running:
            raise EngineDead("the fake engine is not running")
        if self._dead is not None:
            raise EngineDead(f"the fake engine died: {self._dead}")

    # ------------------------------------------------------------------ generation

    def pending_requests(self) -> int:
        return self._pending

    def token(self, prompt_ids: list[int], index: int, position: int, seed: int | None,
              served: str) -> int:
        """The token a request gets at `position` of sample `index`; `served` names the weights
        ("" = base, an adapter's engine name, or the merged folder)."""
        key = f"{served}|{seed}|{index}|{position}|{','.join(map(str, prompt_ids))}"
        return zlib.crc32(key.encode()) % self.vocab_size

    def served_by(self, adapter: AdapterHandle | None) -> str:
        if adapter is not None:
            return adapter.engine_name
        return "" if self._weights is None else f"merged:{self._weights}"

    async def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        request_id: str,
        adapter: AdapterHandle | None,
        stream: bool,
        on_submit: Callable[[], None] | None = None,
    ) -> AsyncIterator[EngineOutput]:
        await self.check_health()
        if adapter is not None and self._loaded.get(adapter.engine_id) != adapter.engine_name:
            raise InvalidArgument(f"adapter {adapter.engine_name} is not loaded")
        self._pending += 1
        try:
            if on_submit is not None:
                on_submit()
            tokens: list[list[int]] = [[] for _ in range(sampling.n)]
            for position in range(sampling.max_tokens):
                await self._unpaused.wait()
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                await self.check_health()
                # What serves the request is read per token: merged weights change under it.
                served = self.served_by(adapter)
                step = [self.token(prompt_ids, i, position, sampling.seed, served)
                        for i in range(sampling.n)]
                for i, tok in enumerate(step):
                    tokens[i].append(tok)
                last = position == sampling.max_tokens - 1
                if stream:
                    yield EngineOutput([self._delta(i, [tok], sampling, position, last)
                                        for i, tok in enumerate(step)], finished=last)
            if not stream:
                yield EngineOutput([self._delta(i, toks, sampling, 0, True)
                                    for i, toks in enumerate(tokens)], finished=True)
        finally:
            self._pending -= 1

    @staticmethod
    def _delta(index: int, token_ids: list[int], sampling: Sampling, first: int,
               finished: bool) -> CompletionDelta:
        logprobs = [-0.01 * (first + k + 1) for k in range(len(token_ids))]
        top = [[(t, lp)] * sampling.top_logprobs for t, lp in zip(token_ids, logprobs,
                                                                   strict=True)]
        return CompletionDelta(
            index=index,
            text="".join(f" t{t}" for t in token_ids),
            token_ids=token_ids,
            logprobs=logprobs if sampling.logprobs else [],
            top_logprobs=top if sampling.top_logprobs else [],
            finish_reason="length" if finished else None,
        )

    @contextlib.asynccontextmanager
    async def paused(self):
        self._pauses += 1
        self._unpaused.clear()
        try:
            yield
        finally:
            self._pauses -= 1
            if self._pauses == 0:
                self._unpaused.set()

    # ------------------------------------------------------------------ adapters

    async def add_adapter(self, handle: AdapterHandle) -> None:
        if self.fail_next_load is not None:
            reason, self.fail_next_load = self.fail_next_load, None
            raise InvalidArgument(f"the engine refused adapter {handle.engine_name}: {reason}")
        self._loaded[handle.engine_id] = handle.engine_name
        self.added.append(handle.engine_name)

    async def remove_adapter(self, handle: AdapterHandle) -> None:
        self._loaded.pop(handle.engine_id, None)
        self.removed.append(handle.engine_name)

    def loaded(self) -> set[str]:
        return set(self._loaded.values())

    async def load_merged(self, weights_dir: Path | None) -> None:
        async with self.paused():
            if self.fail_next_load is not None:
                reason, self.fail_next_load = self.fail_next_load, None
                raise InvalidArgument(f"the engine could not merge {weights_dir}: {reason}")
            self._weights = weights_dir
            self.merged.append(weights_dir)
