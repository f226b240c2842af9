"""A de-duplicating, delaying work queue of FineTuningJob keys.

Watch events only say "look at this job again"; the key is queued once no
matter how many events arrive, a key is never reconciled twice at the same
time, and failures are retried with exponential back-off. New and edited
jobs go first, then changes to their children, then keys whose timer came due
(resyncs, back-off): neither a thousand resyncs nor a thousand pods starting
hold up a new job.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Callable

Key = tuple[str, str]  # (namespace, name)

# Lanes, taken in this order: a job that is new or was edited, then a change to
# a job's children, then a timer that came due (resync, back-off).
NEW, CHANGED, DUE = 0, 1, 2


class WorkQueue:
    def __init__(self, on_depth: Callable[[int], None] | None = None) -> None:
        self._lanes: list[deque[Key]] = [deque(), deque(), deque()]
        self._lane_of: dict[Key, int] = {}  # queued keys; a lane may hold stale entries
        self._has_ready = asyncio.Event()
        self._processing: set[Key] = set()
        self._dirty: dict[Key, int] = {}
        self._delayed: list[tuple[float, Key]] = []
        self._due: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._wakeup = asyncio.Event()
        self._on_depth = on_depth or (lambda _: None)

    def add(self, key: Key, lane: int = CHANGED) -> None:
        if key in self._processing:
            # Run again after the current reconcile, in the most urgent lane asked for.
            self._dirty[key] = min(lane, self._dirty.get(key, lane))
            return
        current = self._lane_of.get(key)
        if current is not None and current <= lane:
            return
        # New, or moved ahead: the entry left in the slower lane is skipped when reached.
        self._lane_of[key] = lane
        self._lanes[lane].append(key)
        self._has_ready.set()
        self._on_depth(len(self._lane_of))

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
        return len(self._lane_of)

    async def get(self) -> Key:
        while True:
            for index, lane in enumerate(self._lanes):
                while lane:
                    key = lane.popleft()
                    if self._lane_of.get(key) == index:
                        del self._lane_of[key]
                        self._processing.add(key)
                        self._on_depth(len(self._lane_of))
                        return key
            self._has_ready.clear()
            await self._has_ready.wait()

    def done(self, key: Key) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self.add(key, self._dirty.pop(key))

    async def run_timers(self) -> None:
        """Move delayed keys to the ready queue when their time comes."""
        while True:
            now = time.monotonic()
            while self._delayed and self._delayed[0][0] <= now:
                when, key = heapq.heappop(self._delayed)
                if self._due.get(key) == when:  # else superseded by a later plan
                    del self._due[key]
                    self.add(key, DUE)
            timeout = self._delayed[0][0] - now if self._delayed else None
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
