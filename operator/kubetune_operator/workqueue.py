"""A de-duplicating, delaying work queue of FineTuningJob keys.

Watch events only say "look at this job again"; the key is queued once no
matter how many events arrive, a key is never reconciled twice at the same
time, and failures are retried with exponential back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable

Key = tuple[str, str]  # (namespace, name)


class WorkQueue:
    def __init__(self, on_depth: Callable[[int], None] | None = None) -> None:
        self._ready: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._delayed: list[tuple[float, Key]] = []
        self._due: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._wakeup = asyncio.Event()
        self._on_depth = on_depth or (lambda _: None)

    def add(self, key: Key) -> None:
        if key in self._processing:
            self._dirty.add(key)  # run again after the current reconcile
            return
        if key not in self._queued:
            self._queued.add(key)
            self._ready.put_nowait(key)
            self._on_depth(len(self._queued))

    def add_after(self, key: Key, seconds: float) -> None:
        """Look at `key` again in `seconds`, replacing any earlier such plan for it
        (each reconcile reschedules its own resync: they must not pile up)."""
        when = time.monotonic() + seconds
        self._due[key] = when
        heapq.heappush(self._delayed, (when, key))
        self._wakeup.set()

    def retry(self, key: Key) -> float:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = min(300.0, 0.5 * 2 ** (failures - 1))
        self.add_after(key, delay)
        return delay

    def succeeded(self, key: Key) -> None:
        self._failures.pop(key, None)

    async def get(self) -> Key:
        key = await self._ready.get()
        self._queued.discard(key)
        self._processing.add(key)
        self._on_depth(len(self._queued))
        return key

    def done(self, key: Key) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    async def run_timers(self) -> None:
        """Move delayed keys to the ready queue when their time comes."""
        while True:
            now = time.monotonic()
            while self._delayed and self._delayed[0][0] <= now:
                when, key = heapq.heappop(self._delayed)
                if self._due.get(key) == when:  # else superseded by a later plan
                    del self._due[key]
                    self.add(key)
            timeout = self._delayed[0][0] - now if self._delayed else None
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
