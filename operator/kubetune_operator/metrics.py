"""Prometheus metrics of the operator, served on /metrics."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "kubetune_reconcile_total",
    "Reconciles of FineTuningJobs by result.",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time to reconcile one FineTuningJob.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
JOBS_BY_PHASE = Gauge(
    "kubetune_finetuningjobs", "FineTuningJobs by phase.", ["phase"], registry=REGISTRY
)
API_REQUESTS = Counter(
    "kubetune_operator_api_requests_total",
    "Requests the operator sent to the API server.",
    ["verb"],
    registry=REGISTRY,
)
THROTTLED = Counter(
    "kubetune_operator_api_throttled_total",
    "Answers of 429 Too Many Requests, retried after Retry-After.",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "kubetune_work_queue_depth", "FineTuningJobs waiting to be reconciled.", registry=REGISTRY
)

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def observe_reconcile(namespace: str, name: str, phase: str, seconds: float) -> None:
    RECONCILES.labels("success").inc()
    RECONCILE_SECONDS.observe(seconds)
    with _lock:
        _phases[(namespace, name)] = phase
        _publish_phases()


def forget(namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((namespace, name), None)
        _publish_phases()


def _publish_phases() -> None:
    counts: dict[str, int] = {}
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase in (
        "Pending",
        "Validating",
        "Queued",
        "Suspended",
        "Running",
        "Succeeded",
        "Failed",
        "Cancelled",
    ):
        JOBS_BY_PHASE.labels(phase).set(counts.get(phase, 0))


def serve(port: int) -> None:
    if port:
        start_http_server(port, registry=REGISTRY)
