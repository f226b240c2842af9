"""The operator's API client: counted, rate-limited, and patient with 429s.

Like client-go's: a token bucket bounds the requests per second the operator
sends (with a burst), and an answer of 429 Too Many Requests (API priority and
fairness, or a busy server) is retried after the server's Retry-After, a few
times, before the error reaches the reconcile (which then backs off).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kubernetes import client

from kubetune_operator import metrics

MAX_RETRIES_ON_429 = 5
MAX_RETRY_AFTER_S = 10.0


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `take` waits for one."""

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take a token, waiting for it if need be; returns the seconds waited."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= 1
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait:
            self._sleep(wait)  # a reconcile thread, never the event loop
        return wait


def retry_after_seconds(value: str | None) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value))) if value else 1.0
    except ValueError:
        return 1.0


class OperatorApiClient(client.ApiClient):
    """An ApiClient that counts its requests by verb, within a QPS/burst limit."""

    def __init__(self, configuration: client.Configuration, qps: float, burst: int) -> None:
        super().__init__(configuration)
        self.bucket = TokenBucket(qps, burst)

    def call_api(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
        for attempt in range(MAX_RETRIES_ON_429 + 1):
            self.bucket.take()
            metrics.API_REQUESTS.labels(method.upper()).inc()
            response = super().call_api(method, url, *args, **kwargs)
            if response.status != 429 or attempt == MAX_RETRIES_ON_429:
                return response
            metrics.THROTTLED.inc()
            delay = retry_after_seconds(response.getheader("Retry-After"))
            response.read()  # give the connection back before waiting
            time.sleep(delay)
        return response
