"""The three scorer kinds behind one interface: `await scorer.score(items)` gives one raw number
per item. Checking, normalising and weighting the numbers is mix.py's job."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf.plumbing.errors import InvalidArgument
from services.reward.config import RewardConfig
from services.reward.items import Item
from services.reward.metrics import RewardStats
from services.reward.rules import build_rule
from services.reward.spec import ScorerSpec
from services.reward.user_fn import call_arguments, is_async, load_function


class Scorer:
    kind = ""

    def __init__(self, spec: ScorerSpec):
        self.spec = spec
        self.name = spec.name
        self.weight = spec.weight

    async def start(self) -> None:
        """Loads what the scorer needs (a model); failures are FailedPrecondition."""

    async def score(self, items: list[Item]):
        raise NotImplementedError

    async def run(self, items: list[Item]) -> tuple[object, str]:
        """The raw scores and the model version that produced them ("": not versioned)."""
        return await self.score(items), ""

    async def close(self) -> None:
        pass


class RuleScorer(Scorer):
    kind = "rule"

    def __init__(self, spec: ScorerSpec):
        super().__init__(spec)
        self.rule, self.needs_reference = build_rule(spec.arg)

    async def score(self, items: list[Item]) -> list[float]:
        # Rules are microseconds per item: running them on the event loop is cheaper than a hop.
        out = []
        for i, item in enumerate(items):
            if self.needs_reference and not item.reference:
                raise InvalidArgument(f"items[{i}].reference is empty; {self.name} needs it")
            try:
                out.append(self.rule(item))
            except InvalidArgument as exc:
                raise InvalidArgument(f"items[{i}]: {exc.message} ({self.name})") from None
        return out


class PythonScorer(Scorer):
    kind = "python"

    def __init__(self, spec: ScorerSpec):
        super().__init__(spec)
        self.fn = load_function(spec.arg)
        # One thread per function: user code need not be thread-safe, and a slow function
        # never blocks the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="user-fn")

    async def score(self, items: list[Item]):
        prompts, completions, kwargs = call_arguments(items)
        if is_async(self.fn):
            return await self.fn(prompts=prompts, completions=completions, **kwargs)
        call = functools.partial(self.fn, prompts=prompts, completions=completions, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)


class ModelScorer(Scorer):
    kind = "rm"

    def __init__(self, spec: ScorerSpec, config: RewardConfig, stats: RewardStats):
        super().__init__(spec)
        self.config = config
        self.stats = stats
        self.model = None
        self.batcher = None

    async def start(self) -> None:
        from services.reward.batcher import MicroBatcher
        from services.reward.rm import RewardModel

        cfg = self.config
        model = RewardModel(Path(self.spec.arg), cfg.device, cfg.dtype, cfg.rm_max_tokens,
                            cfg.rm_batch_tokens)
        await asyncio.to_thread(model.load)
        self.model = model
        self.batcher = MicroBatcher(
            model.score, cfg.max_batch_size, cfg.max_wait_ms / 1000.0,
            on_batch=self.stats.batch_observer(self.name), name="rm",
        )

    async def score(self, items: list[Item]) -> list[float]:
        return await self.batcher.submit(items)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()


def build_scorer(spec: ScorerSpec, config: RewardConfig, stats: RewardStats) -> Scorer:
    if spec.kind == "rm" and spec.arg == "@active":
        from services.reward.rm_versions import VersionedScorer

        return VersionedScorer(spec, config, stats)
    if spec.kind == "rm":
        return ModelScorer(spec, config, stats)
    if spec.kind == "rule":
        return RuleScorer(spec)
    return PythonScorer(spec)
