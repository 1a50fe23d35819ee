"""Dynamic micro-batching: items from concurrent calls share one forward pass.

A batch leaves as soon as `max_batch_size` items wait, or `max_wait` after the later of the
oldest item's arrival and the end of the previous batch. The second clock matters under load:
while the model runs, callers whose results just came back are still sending their next items,
and without it the queue splits into two halves that alternate (half running, half waiting), so
every pass is half as big as it could be. An item therefore waits at most the running pass plus
`max_wait`. A call's items may be split over batches and share them with other
calls; each gets its own result back. Batches run one at a time in a single worker thread (torch
uses its own threads inside a forward pass; two passes at once would only fight over them).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from rlhf.plumbing.errors import Unavailable

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int, float, float], None] | None = None,
        name: str = "batch",
    ):
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch  # (size, oldest item's wait, run seconds)
        self._queue: deque[tuple[T, asyncio.Future, float]] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._task: asyncio.Task | None = None
        self._running: list[asyncio.Future] = []
        self._closed = False
        self._free_since = 0.0  # monotonic time the previous batch ended

    async def submit(self, items: Sequence[T]) -> list[R]:
        if self._closed:
            raise Unavailable("the reward service is shutting down")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = [loop.create_future() for _ in items]
        self._queue.extend((item, fut, now) for item, fut in zip(items, futures, strict=True))
        self._arrived.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            # A cancelled call takes its waiting items out of later batches.
            for fut in futures:
                fut.cancel()
            raise

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch()
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                entry = self._queue.popleft()
                if not entry[1].done():
                    batch.append(entry)
            if not batch:
                continue
            waited = time.monotonic() - batch[0][2]
            start = time.monotonic()
            self._running = [fut for _, fut, _ in batch]
            try:
                results = await loop.run_in_executor(
                    self._executor, self.fn, [item for item, _, _ in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except Exception as exc:  # noqa: BLE001 - every caller in the batch gets the error
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self._free_since = time.monotonic()
            if self.on_batch is not None:
                self.on_batch(len(batch), waited, self._free_since - start)
            for (_, fut, _), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _wait_for_batch(self) -> None:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = max(self._queue[0][2], self._free_since) + self.max_wait_s
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for fut in [*self._running, *(fut for _, fut, _ in self._queue)]:
            if not fut.done():
                fut.set_exception(Unavailable("the reward service is shutting down"))
        self._queue.clear()
        # A forward pass may still be running: wait for it off the event loop.
        await asyncio.to_thread(self._executor.shutdown, True)
