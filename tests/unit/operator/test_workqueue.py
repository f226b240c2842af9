"""The work queue: one entry per key, never two reconciles of a key at once."""

from __future__ import annotations

import asyncio

from kubetune_operator.workqueue import CHANGED, DUE, NEW, WorkQueue


def run(coro):
    return asyncio.run(coro)


def test_keys_are_deduplicated_until_taken() -> None:
    async def scenario():
        queue = WorkQueue()
        for _ in range(3):
            queue.add(("ns", "a"))
        queue.add(("ns", "b"))
        first, second = await queue.get(), await queue.get()
        assert (first, second) == (("ns", "a"), ("ns", "b"))
        assert queue.ready() == 0

    run(scenario())


def test_a_key_added_while_processing_runs_again_after() -> None:
    async def scenario():
        queue = WorkQueue()
        queue.add(("ns", "a"))
        key = await queue.get()
        queue.add(key)  # an event during the reconcile
        assert queue.ready() == 0  # not concurrently
        queue.done(key)
        assert await asyncio.wait_for(queue.get(), 1) == key

    run(scenario())


def test_a_later_plan_replaces_an_earlier_one() -> None:
    async def scenario():
        queue = WorkQueue()
        timers = asyncio.create_task(queue.run_timers())
        key = ("ns", "a")
        queue.add_after(key, 0.05)
        queue.add_after(key, 0.2)  # rescheduled: the first must not fire
        await asyncio.wait_for(queue.get(), 1)
        queue.done(key)
        assert queue.ready() == 0
        assert not queue._due
        timers.cancel()

    run(scenario())


def test_retries_back_off_exponentially() -> None:
    async def scenario():
        queue = WorkQueue()
        delays = [queue.retry(("ns", "a")) for _ in range(4)]
        assert delays == [0.5, 1.0, 2.0, 4.0]
        queue.succeeded(("ns", "a"))
        assert queue.retry(("ns", "a")) == 0.5

    run(scenario())


def test_new_jobs_go_first_then_changes_then_timers() -> None:
    async def scenario():
        queue = WorkQueue()
        for i in range(3):
            queue.add(("ns", f"resync-{i}"), DUE)
        queue.add(("ns", "pod-changed"), CHANGED)
        queue.add(("ns", "new"), NEW)
        queue.add(("ns", "resync-2"), CHANGED)  # a change to a key waiting as a resync
        queue.add(("ns", "new"), DUE)  # a later, slower ask does not demote it
        assert queue.ready() == 5
        order = [await queue.get() for _ in range(5)]
        assert order == [
            ("ns", "new"),
            ("ns", "pod-changed"),
            ("ns", "resync-2"),
            ("ns", "resync-0"),
            ("ns", "resync-1"),
        ]
        assert queue.ready() == 0

    run(scenario())
