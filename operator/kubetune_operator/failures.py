"""Classify why a Job failed (or is stuck) from what the cluster reports."""

from __future__ import annotations

from datetime import datetime

from kubetune.api.finetuningjob import Failure, FailureReason
from kubetune.api.trainer import EXIT_INPUT_NOT_FOUND, EXIT_INVALID_CONFIG, EXIT_INVALID_DATASET
from kubetune_operator import observed as obs
from kubetune_operator.observed import Obj

_BY_EXIT_CODE = {
    EXIT_INVALID_DATASET: FailureReason.INVALID_DATASET,
    EXIT_INVALID_CONFIG: FailureReason.INVALID_SPEC,
    EXIT_INPUT_NOT_FOUND: FailureReason.INPUT_NOT_FOUND,
}
_OOM_EXIT_CODE = 137
# Failures worth another attempt: running again may succeed (bad input cannot).
RETRYABLE = (FailureReason.TRAINER_ERROR, FailureReason.OOM_KILLED, FailureReason.PREEMPTED)
IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}


def _trainer_message(pod: Obj | None) -> str:
    termination, text = obs.termination_of(pod)
    if termination and termination.error:
        return termination.error.message
    return text


def _failed_pods(pods: list[Obj]) -> list[Obj]:
    return [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") == "Failed" and not obs.was_disrupted(p)
    ]


def classify_pod_failure(pod: Obj) -> Failure:
    """Why one trainer pod failed."""
    state = obs.terminated(pod) or {}
    exit_code = state.get("exitCode")
    message = _trainer_message(pod)
    if state.get("reason") == "OOMKilled" or (exit_code == _OOM_EXIT_CODE and not message):
        return Failure(
            reason=FailureReason.OOM_KILLED,
            message="the trainer ran out of memory (OOMKilled): lower hyperparameters.batchSize or "
            "maxSeqLength, enable hyperparameters.gradientCheckpointing, use LORA/QLORA, or raise "
            "resources.memory",
            exit_code=exit_code,
        )
    if exit_code in _BY_EXIT_CODE:
        return Failure(
            reason=_BY_EXIT_CODE[exit_code], message=message or "bad input", exit_code=exit_code
        )
    return Failure(
        reason=FailureReason.TRAINER_ERROR,
        message=message or f"the trainer exited with code {exit_code}",
        exit_code=exit_code,
    )


def attempt_failure(pods: list[Obj]) -> Failure | None:
    """Why one attempt of a multi-pod job ended: its first failed, undisrupted pod."""
    failed = _failed_pods(pods)
    if not failed:
        return None
    first = min(failed, key=lambda p: (obs.terminated(p) or {}).get("finishedAt") or "")
    return classify_pod_failure(first)


def classify_job_failure(job: Obj, pods: list[Obj]) -> Failure | None:
    """Why a finished Job failed, or None while it has not failed."""
    failed = obs.job_condition(job, "Failed")
    if failed is None:
        return None
    reason = failed.get("reason")
    if reason == "DeadlineExceeded":
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return Failure(
            reason=FailureReason.DEADLINE_EXCEEDED,
            message=f"the job ran longer than activeDeadlineSeconds ({deadline}s) and was stopped",
        )
    last = obs.newest(_failed_pods(pods))
    if last is None:
        disrupted = [p for p in pods if obs.was_disrupted(p)]
        if disrupted:
            return Failure(
                reason=FailureReason.PREEMPTED, message="the trainer pod was preempted or evicted"
            )
        return Failure(
            reason=FailureReason.TRAINER_ERROR, message=failed.get("message") or "the Job failed"
        )
    failure = classify_pod_failure(last)
    if reason == "BackoffLimitExceeded" and failure.reason == FailureReason.TRAINER_ERROR:
        attempts = len(_failed_pods(pods))
        failure.message = f"failed {attempts} time(s), last error: {failure.message}"
    return failure


def image_pull_problem(
    pods: list[Obj], now: datetime, timeout_seconds: int
) -> tuple[str, bool] | None:
    """A pod that cannot pull its image: (message, whether it has waited past the timeout)."""
    for pod in pods:
        state = obs.waiting(pod)
        if state and state.get("reason") in IMAGE_PULL_REASONS:
            image = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("image", "")
            detail = state.get("message") or state.get("reason")
            message = f"cannot pull image {image}: {detail}; check spec.image and the registry credentials"
            started = _parse_time(pod["metadata"].get("creationTimestamp"))
            overdue = started is not None and (now - started).total_seconds() > timeout_seconds
            return message, overdue
    return None


def unschedulable(pods: list[Obj]) -> str | None:
    """The scheduler's explanation when the newest pod cannot be placed."""
    pod = obs.newest([p for p in pods if (p.get("status") or {}).get("phase") == "Pending"])
    if pod is None:
        return None
    scheduled = obs.pod_condition(pod, "PodScheduled")
    if (
        scheduled
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == "Unschedulable"
    ):
        return scheduled.get("message") or "no node can run the trainer pod"
    return None


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
