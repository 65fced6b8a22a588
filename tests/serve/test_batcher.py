"""The batcher alone, without HTTP: rows go back to their own requests, batches stay bounded, admission is bounded."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from clipdeploy.serve.batcher import Batcher, QueueFullError


def _recording_run(batches: list[list[int]], delay: float = 0.0, threads: set | None = None):
    def run(items: list[int]) -> list[int]:
        batches.append(list(items))
        if threads is not None:
            threads.add(threading.get_ident())
        if delay:
            time.sleep(delay)
        return [x * 10 + 1 for x in items]  # each result is a function of its own item only

    return run


def test_interleaved_requests_each_get_their_own_results_in_order() -> None:
    batches: list[list[int]] = []
    threads: set[int] = set()

    async def main() -> None:
        b = Batcher(_recording_run(batches, 0.002, threads), max_batch=8, max_wait_s=0.003, max_queue=10_000)
        b.start()
        rng = random.Random(0)

        async def request(r: int) -> None:
            items = [r * 1000 + i for i in range(rng.randint(1, 20))]  # some larger than max_batch: split
            await asyncio.sleep(rng.random() * 0.02)
            with b.reserve(len(items)):
                got = await asyncio.gather(*b.submit(items))
            assert got == [x * 10 + 1 for x in items], f"request {r} got rows of another request"

        await asyncio.gather(*(request(r) for r in range(64)))
        await b.stop()

    asyncio.run(main())
    assert max(len(x) for x in batches) <= 8
    assert max(len(x) for x in batches) > 1, "no batch ever held more than one item: nothing was batched"
    assert threading.get_ident() not in threads, "inference ran on the event loop's thread"
    assert sorted(x for batch in batches for x in batch) == sorted(set(x for batch in batches for x in batch))


def test_a_batch_waits_at_most_max_wait_for_more_items() -> None:
    batches: list[list[int]] = []

    async def main() -> float:
        b = Batcher(_recording_run(batches), max_batch=32, max_wait_s=0.05, max_queue=100)
        b.start()
        start = time.perf_counter()
        with b.reserve(1):
            await asyncio.gather(*b.submit([1]))
        took = time.perf_counter() - start
        await b.stop()
        return took

    took = asyncio.run(main())
    assert batches == [[1]]
    assert 0.04 <= took < 1.0, f"a lone item took {took:.3f} s; expected about max_wait (0.05 s)"


def test_reserve_refuses_past_max_queue_and_frees_on_exit() -> None:
    b = Batcher(lambda items: items, max_batch=4, max_wait_s=0, max_queue=10)
    with b.reserve(6):
        assert b.depth == 6
        with pytest.raises(QueueFullError, match="6 of at most 10"):
            with b.reserve(5):
                pass
        with b.reserve(4):
            assert b.depth == 10
    assert b.depth == 0


def test_a_failing_batch_fails_only_its_own_items_and_the_batcher_goes_on() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if -1 in items:
            raise ValueError("broken batch")
        return items

    async def main() -> None:
        b = Batcher(run, max_batch=4, max_wait_s=0, max_queue=100)
        b.start()
        bad = b.submit([-1])
        with pytest.raises(ValueError, match="broken batch"):
            await bad[0]
        assert await asyncio.gather(*b.submit([5, 6])) == [5, 6]
        await b.stop()

    asyncio.run(main())


def test_cancelled_items_are_not_run_and_stop_finishes_queued_work() -> None:
    batches: list[list[int]] = []

    async def main() -> list[int]:
        b = Batcher(_recording_run(batches, 0.05), max_batch=2, max_wait_s=0, max_queue=100)
        b.start()
        first = b.submit([1])  # runs now, for 50 ms
        await asyncio.sleep(0.01)
        gone = b.submit([2])
        kept = b.submit([3, 4])
        gone[0].cancel()  # its client went away while it waited
        await b.stop()  # refuses new work, finishes what is queued
        with pytest.raises(QueueFullError):
            with b.reserve(1):
                pass
        return [await first[0], *[await f for f in kept]]

    assert asyncio.run(main()) == [11, 31, 41]
    assert [2] not in batches and all(2 not in batch for batch in batches)


def test_a_cancelled_request_leaves_nothing_queued_and_stop_waits_for_admitted_requests() -> None:
    async def main() -> None:
        b = Batcher(_recording_run([], 0.2), max_batch=1, max_wait_s=0, max_queue=4)
        b.start()
        running = b.submit([0])  # runs for 0.2 s: what follows waits in the queue
        await asyncio.sleep(0.01)
        for _ in range(20):  # each admitted request is cancelled while its items wait
            with b.reserve(3):
                futures = b.submit([1, 2, 3])
                for f in futures:
                    f.cancel()
                b.drop_done()
            assert b.queued <= b.max_queue, f"{b.queued} items queued with at most {b.max_queue} admitted"
        assert b.queued == 0 and b.depth == 0
        await running[0]
        # stop() waits for a request that was admitted but has not submitted yet (it is still decoding)
        admitted = b.reserve(1)
        admitted.__enter__()

        async def late_submit() -> int:
            await asyncio.sleep(0.1)
            try:
                return await b.submit([7])[0]
            finally:
                admitted.__exit__(None, None, None)

        late = asyncio.get_running_loop().create_task(late_submit())
        await asyncio.sleep(0)
        await asyncio.wait_for(b.stop(), timeout=10)
        assert late.done() and late.result() == 71

    asyncio.run(main())
