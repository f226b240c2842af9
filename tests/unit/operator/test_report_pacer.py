"""Progress reports reach the status at most once per interval per job; validation and
result reports at once; a deleted job's pace is forgotten."""

from __future__ import annotations

from kubetune_operator import handlers
from kubetune_operator.handlers import ReportPacer

from kubetune.api.trainer import REPORT_PROGRESS_KEY


class Queue:
    def __init__(self) -> None:
        self.added: list[tuple] = []
        self.later: list[tuple] = []

    def add(self, key: tuple) -> None:
        self.added.append(key)

    def add_after(self, key: tuple, delay: float) -> None:
        self.later.append((key, round(delay, 3)))


def test_progress_is_paced_and_results_are_not(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: now[0])
    queue = Queue()
    pacer = ReportPacer(queue, 10)
    key = ("ns", "job")
    pacer(key, REPORT_PROGRESS_KEY)
    assert queue.added == [key]
    now[0] = 104.0
    pacer(key, REPORT_PROGRESS_KEY)
    assert queue.later == [(key, 6.0)]  # at most once per 10 s
    pacer(key, "result")
    assert queue.added == [key, key]  # a result at once
    pacer(("ns", "other"), REPORT_PROGRESS_KEY)
    assert queue.added[-1] == ("ns", "other")  # per job

    pacer.forget(key)
    pacer.forget(("ns", "other"))
    assert pacer.last == {}
