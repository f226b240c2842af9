"""What the operator saw of a FineTuningJob's children, and helpers to read it.

Objects are the API server's JSON (camelCase dicts), as listed or read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from pydantic import ValidationError

from kubetune.api.trainer import (
    REPORT_PROGRESS_KEY,
    REPORT_RESULT_KEY,
    REPORT_VALIDATION_KEY,
    ProgressReport,
    ResultReport,
    TrainerTermination,
    ValidationReport,
)
from kubetune_operator import naming

Obj = dict[str, Any]
Report = TypeVar("Report", ProgressReport, ValidationReport, ResultReport)


@dataclass(frozen=True)
class Observed:
    """A snapshot of everything that exists for one FineTuningJob."""

    now: datetime
    validate_job: Obj | None = None
    train_job: Obj | None = None
    validate_pods: list[Obj] = field(default_factory=list)
    train_pods: list[Obj] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)
    registered_model: Obj | None = None
    # Kueue's Workload for the training Job, when a queue manages it.
    workload: Obj | None = None
    # A child that could not be created: (condition reason, message).
    blocked: tuple[str, str] | None = None


def workload_condition(workload: Obj | None, type_: str) -> Obj | None:
    for condition in ((workload or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return condition
    return None


def queue_message(workload: Obj | None) -> str:
    """What Kueue says of a Workload it has not admitted (or has evicted): its own words,
    e.g. "couldn't assign flavors to pod set main: insufficient unused quota ..."."""
    for type_, status in (("Evicted", "True"), ("QuotaReserved", "False")):
        condition = workload_condition(workload, type_)
        if condition is not None and condition.get("status") == status:
            return condition.get("message") or condition.get("reason") or ""
    return ""


def queue_preemptions(workload: Obj | None) -> int:
    """How many times Kueue preempted this Workload (its own eviction statistics)."""
    stats = ((workload or {}).get("status") or {}).get("schedulingStats") or {}
    return sum(
        int(e.get("count") or 0)
        for e in stats.get("evictions") or []
        if e.get("reason") == "Preempted"
    )


def workload_active(workload: Obj | None) -> bool:
    return bool(((workload or {}).get("spec") or {}).get("active", True))


def controlled_by(obj: Obj, uid: str) -> bool:
    """Whether `obj`'s controller is the object with this uid (the only owner we adopt)."""
    return any(
        ref.get("controller") and ref.get("uid") == uid
        for ref in obj.get("metadata", {}).get("ownerReferences") or []
    )


def controller_of(obj: Obj) -> str:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return f"{ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')})"
    return "no controller"


def restart_of(obj: Obj) -> int:
    """Which restart of a multi-pod job a Job or pod belongs to (0: the first attempt)."""
    annotations = obj.get("metadata", {}).get("annotations") or {}
    value = annotations.get(naming.ANNOTATION_RESTART, "0")
    return int(value) if value.isdigit() else 0


def attempt_pods(job: Obj, pods: list[Obj]) -> list[Obj]:
    """The pods of the Job's attempt: those of an earlier one may still be terminating."""
    uid = job["metadata"].get("uid")
    return [
        p
        for p in pods
        if not uid
        or any(ref.get("uid") == uid for ref in p["metadata"].get("ownerReferences") or [])
    ]


STARTED_POD_PHASES = ("Running", "Succeeded", "Failed")


def training_began(job: Obj, pods: list[Obj]) -> bool:
    """Whether a trainer ran: a pod got past Pending, or the Job finished. Pending pods
    (waiting for GPUs, say) have done nothing yet."""
    if job_condition(job, "Complete") or job_condition(job, "Failed"):
        return True
    return any((p.get("status") or {}).get("phase") in STARTED_POD_PHASES for p in pods)


def job_condition(job: Obj | None, type_: str) -> Obj | None:
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return condition
    return None


def pod_condition(pod: Obj, type_: str) -> Obj | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return condition
    return None


def container_status(pod: Obj) -> Obj | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else None


def terminated(pod: Obj) -> Obj | None:
    status = container_status(pod)
    return ((status or {}).get("state") or {}).get("terminated")


def waiting(pod: Obj) -> Obj | None:
    status = container_status(pod)
    return ((status or {}).get("state") or {}).get("waiting")


def was_disrupted(pod: Obj) -> bool:
    condition = pod_condition(pod, "DisruptionTarget")
    return condition is not None and condition.get("status") == "True"


def newest(pods: list[Obj]) -> Obj | None:
    return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


def termination_of(pod: Obj | None) -> tuple[TrainerTermination | None, str]:
    """The trainer's termination document, or None and the raw text."""
    state = terminated(pod) if pod else None
    text = ((state or {}).get("message") or "").strip()
    if not text:
        return None, ""
    try:
        return TrainerTermination.model_validate_json(text), text
    except ValidationError:
        return None, text


def _report_value(report: dict[str, str], key: str, model: type[Report]) -> Report | None:
    raw = report.get(key)
    if not raw:
        return None
    try:
        return model.model_validate_json(raw)
    except (ValidationError, json.JSONDecodeError):
        return None


def progress_report(report: dict[str, str]) -> ProgressReport | None:
    return _report_value(report, REPORT_PROGRESS_KEY, ProgressReport)


def _reported(
    report: dict[str, str], key: str, model: type[Report], pods: list[Obj], field: str
) -> Report | None:
    """A trainer report: from the report ConfigMap, else from a pod's termination message."""
    from_map = _report_value(report, key, model)
    if from_map:
        return from_map
    for pod in pods:
        termination, _ = termination_of(pod)
        if termination and getattr(termination, field):
            return getattr(termination, field)
    return None


def validation_report(observed: Observed) -> ValidationReport | None:
    return _reported(
        observed.report,
        REPORT_VALIDATION_KEY,
        ValidationReport,
        observed.validate_pods,
        "validation",
    )


def result_report(observed: Observed) -> ResultReport | None:
    return _reported(
        observed.report, REPORT_RESULT_KEY, ResultReport, observed.train_pods, "result"
    )
