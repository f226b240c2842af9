"""Pieces shared by the benchmarks that run operators on the local cluster
(bench/operator_scale.py, bench/peers.py): the simulated fleet, watches that wait
for a count of objects, and readings of a process's metrics, CPU and memory."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kubernetes import watch

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO / "operator"), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from kubetune.dev.nodes import NodeSpec  # noqa: E402
from kubetune.dev.processes import OperatorProcess  # noqa: E402

CREATE_THREADS = 16


def fleet(nodes: int) -> list[NodeSpec]:
    return [
        NodeSpec(
            name=f"bench-gpu-{i}",
            pool="bench",
            cpu="256",
            memory="2Ti",
            gpus=8,
            gpu_product="NVIDIA-H100-80GB-HBM3",
            gpu_memory_mib=81559,
        )
        for i in range(nodes)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def watch_until(list_fn, count: int, done, timeout: float, on_event=None, **list_kwargs) -> float:
    """Watch until `done(seen)` holds for `count` objects; return the time it happened."""
    seen: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    # A busy API server may end a watch early: watch again (a new watch starts with
    # the objects that exist, so nothing is missed) until done or out of time.
    while len(seen) < count and time.monotonic() < deadline:
        stream = watch.Watch()
        left = max(1, int(deadline - time.monotonic()))
        for event in stream.stream(list_fn, timeout_seconds=left, **list_kwargs):
            obj = event["object"]
            name = obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name
            if on_event:
                on_event(name, obj)
            if done(obj):
                seen[name] = obj
            if len(seen) >= count or time.monotonic() > deadline:
                stream.stop()
    if len(seen) < count:
        raise TimeoutError(f"only {len(seen)} of {count} done after {timeout}s")
    return time.monotonic()


def metric_total(text: str, name: str) -> float:
    """The sum of a Prometheus counter over all its label sets, from /metrics text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def api_requests(operator: OperatorProcess) -> float:
    return metric_total(operator.metrics(), "kubetune_operator_api_requests_total")


def peak_memory_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
