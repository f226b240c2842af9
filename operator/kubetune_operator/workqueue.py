"""A de-duplicating, delaying work queue of FineTuningJob keys.

Watch events only say "look at this job again"; the key is queued once no
matter how many events arrive, a key is never reconciled twice at the same
time, and failures are retried with exponential back-off. Keys an event
brought (a new job, a pod that changed) go ahead of those whose timer came due
(resyncs, back-off): a thousand resyncs never hold up a new job.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Callable

Key = tuple[str, str]  # (namespace, name)


class WorkQueue:
    def __init__(self, on_depth: Callable[[int], None] | None = None) -> None:
        self._urgent: deque[Key] = deque()
        self._later: deque[Key] = deque()
        self._has_ready = asyncio.Event()
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._delayed: list[tuple[float, Key]] = []
        self._due: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._wakeup = asyncio.Event()
        self._on_depth = on_depth or (lambda _: None)

    def add(self, key: Key, *, urgent: bool = True) -> None:
        if key in self._processing:
            self._dirty.add(key)  # run again after the current reconcile
            return
        if key in self._queued:
            if urgent and key in self._later:  # an event about a key waiting as a resync
                self._later.remove(key)
                self._urgent.append(key)
            return
        self._queued.add(key)
        (self._urgent if urgent else self._later).append(key)
        self._has_ready.set()
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

    def ready(self) -> int:
        """Keys waiting for a worker."""
        return len(self._urgent) + len(self._later)

    async def get(self) -> Key:
        while not (self._urgent or self._later):
            self._has_ready.clear()
            await self._has_ready.wait()
        key = self._urgent.popleft() if self._urgent else self._later.popleft()
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
                    self.add(key, urgent=False)
            timeout = self._delayed[0][0] - now if self._delayed else None
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
