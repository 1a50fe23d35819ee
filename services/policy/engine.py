"""The engine interface the policy servicer talks to, and the plain types it exchanges.

The servicer never touches vLLM types: it hands an engine token ids, a `Sampling` and an optional
`AdapterHandle`, and reads `EngineOutput`s back. `vllm_backend/engine.py` implements this on
vLLM's AsyncLLM; `fake_engine.py` is a model-free stand-in for tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

from rlhf.plumbing.errors import Unavailable


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters (see SamplingParams in policy.proto for meanings)."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass(frozen=True)
class AdapterHandle:
    """One loaded adapter version as the engine knows it."""

    name: str
    version: int
    engine_id: int  # unique per load in this process; vLLM keys its caches by it and the name
    path: Path

    @property
    def engine_name(self) -> str:
        return f"{self.name}@v{self.version}"


@dataclass
class CompletionDelta:
    """New tokens of one completion (all of them when not streaming)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_string: str = ""


@dataclass
class EngineOutput:
    completions: list[CompletionDelta]
    finished: bool


class EngineDead(Unavailable):
    """The engine can no longer serve (its core process died, or it was never started)."""


class Engine(Protocol):
    """A generation engine. Its lifecycle is `async with engine:` (started on entry, every
    resource it opened closed on exit, also after an error). The attributes are valid inside."""

    max_model_len: int
    vocab_size: int
    dtype: str
    version: str  # engine name and version, e.g. "vllm 0.32.0" (GetInfo.engine)

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info) -> None: ...

    async def check_health(self) -> None:
        """Returns when the engine can serve; raises EngineDead, saying why, when it cannot."""
        ...

    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        request_id: str,
        adapter: AdapterHandle | None,
        stream: bool,
        on_submit: Callable[[], None] | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Yields outputs until finished. Cancelling the iteration aborts the request.
        on_submit is called once the request is queued for the engine, ahead of anything sent
        to it later (so a paused engine takes it in its first step after the pause)."""
        ...

    def paused(self) -> AbstractAsyncContextManager[None]:
        """No engine step runs inside the block (it begins once the current step ends);
        requests in the engine stay there and go on after it. Blocks may overlap: the engine
        runs again when the last one ends."""
        ...

    async def add_adapter(self, handle: AdapterHandle) -> None:
        """lora mode: makes the version servable under its own name and id; raises (a
        ServiceError saying why) when the engine refuses it."""
        ...

    async def remove_adapter(self, handle: AdapterHandle) -> None: ...

    async def load_merged(self, weights_dir: Path | None) -> None:
        """merged mode: replace the served weights in place (None = the base weights), in a
        paused() block of its own (or the caller's, to act before the engine steps again).
        Requests still in the engine go on with the new weights from a clean state (their
        prompt and tokens so far recomputed); no cached state of the old weights is reused."""
        ...

    def pending_requests(self) -> int:
        """Requests in the engine and not finished."""
        ...
