"""Dynamic batching for one model tower: a bounded queue in front of one inference thread.

Requests ``reserve`` room for their items (the whole request is admitted, or refused with
``QueueFullError``, so memory stays bounded), ``submit`` the prepared items and await one future
per item. A single collector task takes up to ``max_batch`` items, waiting at most ``max_wait_s``
after the first one for more, and runs the batch in the batcher's own thread, never on the event
loop. Each future gets the row of its own item, so rows cannot cross between requests however they
interleave; an item whose request went away (a cancelled future) is dropped before the batch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Batcher", "QueueFullError"]


class QueueFullError(Exception):
    """The batcher has no room for a request's items: answer 503 and ask the client to retry."""

    def __init__(self, wanted: int, depth: int, limit: int) -> None:
        super().__init__(f"the queue holds {depth} of at most {limit} items; {wanted} more do not fit")
        self.wanted, self.depth, self.limit = wanted, depth, limit


class Batcher(Generic[T, R]):
    """Groups single items from many requests into batches for ``run`` (a list in, one result per item out)."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        name: str = "batcher",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue} must be >= 1 and max_wait_s >= 0")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.name = name
        self._on_batch = on_batch  # called with each batch's size (metrics)
        self._pending: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._reserved = 0  # items admitted and not yet answered: in decode, queued or running
        self._count_lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._running = False  # a batch is in the inference thread

    # ---- admission ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Items admitted and not yet answered (the bound ``max_queue`` applies to this)."""
        return self._reserved

    @property
    def queued(self) -> int:
        """Items waiting in the queue now (never more than the admitted ``depth``)."""
        return len(self._pending)

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        """Admit ``n`` items for the life of the block, or raise QueueFullError at once."""
        with self._count_lock:
            if self._closing or self._reserved + n > self.max_queue:
                raise QueueFullError(n, self._reserved, self.max_queue)
            self._reserved += n
        try:
            yield
        finally:
            with self._count_lock:
                self._reserved -= n

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the collector on the running event loop (once)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"clipdeploy-{self.name}")
            self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"clipdeploy-{self.name}")

    async def stop(self) -> None:
        """Refuse new items, finish the queued ones, then stop the collector and its thread."""
        self._closing = True
        if self._task is None:
            return
        # Admitted requests (still decoding), queued and running batches all finish first.
        while self._pending or self._running or self._reserved:
            assert self._wake is not None
            self._wake.set()
            await asyncio.sleep(0.005)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ---- work -----------------------------------------------------------------------------------

    def submit(self, items: Sequence[T]) -> list[asyncio.Future[R]]:
        """Queue ``items`` (already reserved) and return one future per item, in order."""
        if self._task is None or self._wake is None:
            raise RuntimeError(f"{self.name}: start() the batcher on the event loop first")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for item in items:
            fut: asyncio.Future[R] = loop.create_future()
            self._pending.append((item, fut))
            futures.append(fut)
        self._wake.set()
        return futures

    def drop_done(self) -> None:
        """Forget queued items whose futures are already done (their request was cancelled or failed), so
        the queue never holds more than what is admitted. Runs on the event loop, like every queue change."""
        if any(fut.done() for _, fut in self._pending):
            self._pending = deque((item, fut) for item, fut in self._pending if not fut.done())

    async def _collect(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            if len(self._pending) < self.max_batch and self.max_wait_s > 0:
                deadline = loop.time() + self.max_wait_s
                while len(self._pending) < self.max_batch and not self._closing:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), remaining)
            batch = []
            self._running = True
            while self._pending and len(batch) < self.max_batch:
                item, fut = self._pending.popleft()
                if not fut.done():  # its request was cancelled (client gone): no work for it
                    batch.append((item, fut))
            try:
                if batch:
                    await self._run_batch(loop, batch)
            finally:
                self._running = False

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            results = await loop.run_in_executor(self._executor, self.run, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(batch)} items gave {len(results)} results")
        except Exception as e:  # the whole batch failed: every request in it gets the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)


def describe(batcher: Batcher[Any, Any]) -> str:
    return f"{batcher.name}: max batch {batcher.max_batch}, wait {batcher.max_wait_s * 1000:g} ms, queue {batcher.max_queue}"
