"""Derive a FineTuningJob's status from what exists. Pure: same inputs, same status.

Conditions are the truth; `phase` is a display summary derived from them.
Terminal outcomes (Succeeded, Failed, Cancelled) stick once recorded, because
finished Jobs and pods are garbage-collected after their TTL.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from kubetune.api.defaults import resolve_hyperparameters
from kubetune.api.finetuningjob import (
    ArtifactStatus,
    Failure,
    FailureReason,
    FineTuningJobSpec,
    FineTuningJobStatus,
    Phase,
    Progress,
    ProgressDisplay,
    ResolvedHyperparameters,
)
from kubetune_operator import builders, failures
from kubetune_operator import conditions as c
from kubetune_operator import observed as obs
from kubetune_operator.evaluated import record_evaluation
from kubetune_operator.observed import Obj, Observed
from kubetune_operator.registration import registration_conditions
from kubetune_operator.settings import OperatorSettings


def format_duration(seconds: float) -> str:
    """3725 -> '1h2m', 95 -> '1m35s'."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def format_number(value: float | None) -> str:
    """4 significant digits: 6.039865 -> '6.04', 0.000123456 -> '0.0001235'."""
    return "" if value is None else f"{value:.4g}"


def format_rate(value: float | None) -> str:
    """1234.5 -> '1.23k', 987.6 -> '988', 2.5e6 -> '2.5M'."""
    if value is None:
        return ""
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def is_terminal(status: FineTuningJobStatus) -> bool:
    return status.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)


def _progress(observed: Observed, previous: Progress | None) -> Progress | None:
    report = obs.progress_report(observed.report)
    if report is None:
        return previous
    # As estimated at report time: counting down here would rewrite status on
    # every look, and each write would trigger another look.
    eta_seconds = report.eta_seconds
    percent = int(100 * report.step / report.total_steps) if report.total_steps else 0
    return Progress(
        step=report.step,
        total_steps=report.total_steps,
        steps=f"{report.step}/{report.total_steps}",
        percent=min(100, percent),
        epoch=report.epoch,
        loss=report.loss,
        eval_loss=report.eval_loss,
        learning_rate=report.learning_rate,
        tokens_per_second=report.tokens_per_second,
        eta_seconds=eta_seconds,
        eta=format_duration(eta_seconds) if eta_seconds is not None else "",
        display=ProgressDisplay(
            loss=format_number(report.loss),
            eval_loss=format_number(report.eval_loss),
            tokens_per_second=format_rate(report.tokens_per_second),
        ),
        updated_at=report.timestamp,
    )


def _completed_progress(progress: Progress | None) -> Progress | None:
    if progress is None:
        return None
    return progress.model_copy(
        update={
            "step": progress.total_steps or progress.step,
            "steps": f"{progress.total_steps or progress.step}/{progress.total_steps or progress.step}",
            "percent": 100,
            "eta_seconds": 0,
            "eta": "0s",
        }
    )


def _phase(conds: c.Conditions, spec: FineTuningJobSpec, observed: Observed) -> Phase:
    if conds.is_true(c.CANCELLED):
        return Phase.CANCELLED
    if conds.is_true(c.FAILED):
        return Phase.FAILED
    if conds.is_true(c.SUCCEEDED):
        if not spec.registration.enabled or conds.is_true(c.REGISTERED):
            return Phase.SUCCEEDED
        return Phase.RUNNING
    if conds.is_true(c.SUSPENDED):
        return Phase.QUEUED if conds.reason(c.SUSPENDED) == c.WAITING_FOR_QUEUE else Phase.SUSPENDED
    if conds.is_true(c.RUNNING) or conds.reason(c.RUNNING) == c.RESTARTING:
        return Phase.RUNNING
    validated = conds.get(c.DATASET_VALIDATED)
    if validated is not None and validated.status == "Unknown":
        return Phase.VALIDATING
    if observed.train_job is not None:
        return Phase.QUEUED
    return Phase.PENDING


def _hyperparameters(
    spec: FineTuningJobSpec, observed: Observed, recorded: ResolvedHyperparameters | None
) -> ResolvedHyperparameters:
    """What the trainer reported it trains with (it resolves auto again on its hardware
    and model); before any report, what the existing Job was built with (recorded when
    it was created, never recomputed by a later operator); with no Job yet, what the
    operator resolves from the spec."""
    result = obs.result_report(observed) if observed.train_job is not None else None
    if result is not None and result.hyperparameters is not None:
        return result.hyperparameters
    progress = obs.progress_report(observed.report)
    if progress is not None and progress.hyperparameters is not None:
        return progress.hyperparameters
    if observed.train_job is not None and recorded is not None:
        return recorded
    return resolve_hyperparameters(spec)


def _trainer_image(observed: Observed, would_be: str) -> str:
    """The image of the training Job that exists; before it, the one it would get."""
    job = observed.train_job
    if job is not None:
        template = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
        containers = template.get("containers") or []
        if containers and containers[0].get("image"):
            return containers[0]["image"]
    return would_be


def derive_status(
    body: dict,
    spec: FineTuningJobSpec,
    previous: FineTuningJobStatus,
    observed: Observed,
    settings: OperatorSettings,
) -> FineTuningJobStatus:
    """The status that the observed objects imply, given the status recorded so far."""
    meta = body["metadata"]
    generation = meta.get("generation", 1)
    now = observed.now
    status = previous.model_copy(deep=True)
    train = observed.train_job
    if not is_terminal(previous) and train is not None and not builders.spec_applied(train, spec):
        # Training began before an edit could be applied (the API refuses edits once
        # status.startTime is set, not before): observedGeneration keeps saying which
        # generation the running Job is.
        generation = previous.observed_generation or generation
    conds = c.Conditions(previous.conditions, generation, now)
    status.observed_generation = generation

    if is_terminal(previous):
        # A finished record: what it trained with was written while it ran.
        registration_conditions(status, conds, spec, observed.registered_model, meta["uid"])
        return summarise(status, conds, _phase(conds, spec, observed))

    status.trainer_image = _trainer_image(observed, spec.image or settings.trainer_image)
    status.hyperparameters = _hyperparameters(spec, observed, previous.hyperparameters)
    status.world_size = status.hyperparameters.world_size
    if train is not None:
        status.job_name = train["metadata"]["name"]

    status.progress = _progress(observed, previous.progress)
    if spec.cancel:
        conds.set(
            c.CANCELLED,
            True,
            c.CANCELLED_BY_USER,
            "cancelled by setting spec.cancel; the record is kept",
        )
        conds.set(c.RUNNING, False, c.STOPPED, "cancelled")
        status.completion_time = status.completion_time or now
        return summarise(status, conds, Phase.CANCELLED)

    failure = _validation(status, conds, spec, observed)
    if failure is None:
        failure = _training(status, conds, spec, observed, settings, meta)
    if failure is not None:
        status.failure = failure
        conds.set(c.FAILED, True, failure.reason.value, failure.message)
        conds.set(c.RUNNING, False, c.STOPPED, "the job failed")
        status.completion_time = status.completion_time or now
    registration_conditions(status, conds, spec, observed.registered_model, meta["uid"])
    if train is None and conds.reason(c.REGISTERED) == c.NAME_TAKEN:
        conds.set(
            c.RUNNING,
            False,
            c.NOT_STARTED,
            "no training Job while the registration name is taken (see the Registered condition)",
        )
    if observed.blocked is not None:
        reason, message = observed.blocked
        conds.set(c.RUNNING, False, reason, message)
    return summarise(status, conds, _phase(conds, spec, observed))


def summarise(
    status: FineTuningJobStatus, conds: c.Conditions, phase: Phase
) -> FineTuningJobStatus:
    """The phase and the Ready condition, from the other conditions."""
    status.phase = phase
    c.set_ready(conds, phase.value, summary_message(conds, phase))
    status.conditions = conds.as_list()
    return status


def summary_message(conds: c.Conditions, phase: Phase) -> str:
    """What the condition behind the phase says."""
    behind = {
        Phase.FAILED: c.FAILED,
        Phase.CANCELLED: c.CANCELLED,
        Phase.SUSPENDED: c.SUSPENDED,
        Phase.QUEUED: c.SUSPENDED if conds.is_true(c.SUSPENDED) else c.RUNNING,
        Phase.VALIDATING: c.DATASET_VALIDATED,
        Phase.SUCCEEDED: c.SUCCEEDED,
    }.get(phase, c.RUNNING)
    if phase == Phase.RUNNING and conds.is_true(c.SUCCEEDED):
        behind = c.REGISTERED  # trained; registering
    condition = conds.get(behind)
    return condition.message if condition is not None else ""


def _validation(
    status: FineTuningJobStatus, conds: c.Conditions, spec: FineTuningJobSpec, observed: Observed
) -> Failure | None:
    if not spec.dataset.validate_first:
        conds.set(
            c.DATASET_VALIDATED, True, c.VALIDATION_SKIPPED, "spec.dataset.validateFirst is false"
        )
        return None
    if conds.is_true(c.DATASET_VALIDATED):
        return None
    job = observed.validate_job
    if job is not None and obs.job_condition(job, "Complete"):
        report = obs.validation_report(observed)
        message = "the dataset is valid"
        if report is not None:
            status.dataset_digest = report.digest
            message = (
                f"{report.rows_kept} of {report.rows_read} rows kept: {report.train_rows} to train on, "
                f"{report.eval_rows} to evaluate; {report.tokens} tokens"
            )
        conds.set(c.DATASET_VALIDATED, True, c.DATASET_VALID, message)
        return None
    if job is not None:
        failure = failures.classify_job_failure(job, observed.validate_pods)
        if failure is not None:
            if failure.reason == FailureReason.TRAINER_ERROR:
                failure.message = f"dataset validation failed: {failure.message}"
            conds.set(c.DATASET_VALIDATED, False, failure.reason.value, failure.message)
            return failure
    conds.set(
        c.DATASET_VALIDATED,
        None,
        c.VALIDATING,
        "checking the dataset in a CPU-only pod before GPUs are requested",
    )
    return None


def _training(
    status: FineTuningJobStatus,
    conds: c.Conditions,
    spec: FineTuningJobSpec,
    observed: Observed,
    settings: OperatorSettings,
    meta: dict,
) -> Failure | None:
    job = observed.train_job
    pods = observed.train_pods
    distributed = builders.multi_pod(spec)
    if distributed and job is not None:
        pods = obs.attempt_pods(job, pods)
    else:
        _count_disruptions(status, pods)
        failed_pods = [
            p
            for p in pods
            if (p.get("status") or {}).get("phase") == "Failed"
            and not obs.was_disrupted(p)
            # Deleted, then failed: stopped by the Job controller (the queue suspended the
            # Job) or by a person, not a failure of the trainer.
            and not p["metadata"].get("deletionTimestamp")
        ]
        status.retries = max(status.retries, len(failed_pods))
    _count_queue_preemptions(status, observed.workload)

    if job is None:
        if not conds.is_true(c.DATASET_VALIDATED):
            return None
        if spec.suspend:
            conds.set(c.SUSPENDED, True, c.SUSPENDED_BY_USER, "spec.suspend is true")
        conds.set(c.RUNNING, False, c.NOT_STARTED, "the training Job is being created")
        return None

    if obs.training_began(job, pods) and status.start_time is None:
        # Also for a job that finished between two looks: the API's immutability rule
        # keys on startTime.
        status.start_time = _time((job.get("status") or {}).get("startTime")) or observed.now
    if obs.job_condition(job, "Complete"):
        conds.set(c.RUNNING, False, c.TRAINING_COMPLETE, "training finished")
        result = obs.result_report(observed)
        if result is None:
            return Failure(
                reason=FailureReason.REGISTRATION_FAILED,
                message="the trainer exited successfully but reported no result (none reached the "
                "operator's report endpoint nor its termination message)",
            )
        status.metrics = dict(result.metrics)
        record_evaluation(status, conds, spec, result, meta)
        status.dataset_digest = result.dataset_digest or status.dataset_digest
        status.artifact = ArtifactStatus(
            # The trainer reports the path relative to the job's own output folder.
            volume=spec.output.job_location(meta["name"], meta["uid"], result.artifact.path),
            kind=result.artifact.kind,
            digest=result.artifact.digest,
        )
        status.progress = _completed_progress(status.progress)
        finished = obs.job_condition(job, "Complete") or {}
        status.completion_time = (
            status.completion_time or _time(finished.get("lastTransitionTime")) or observed.now
        )
        conds.set(c.SUCCEEDED, True, c.TRAINING_COMPLETE, _metrics_message(status.metrics))
        return None

    failure = failures.classify_job_failure(job, pods)
    if failure is not None and distributed and failure.reason in failures.RETRYABLE:
        return _restart_all(status, conds, spec, job, pods, failure)
    if failure is not None:
        return failure

    pull = failures.image_pull_problem(pods, observed.now, settings.image_pull_timeout_seconds)
    if pull is not None:
        message, overdue = pull
        if overdue:
            return Failure(reason=FailureReason.IMAGE_PULL_FAILED, message=message)
        conds.set(c.RUNNING, False, c.IMAGE_PULL_BACKOFF, message)
        return None

    if (job.get("spec") or {}).get("suspend"):
        if spec.suspend:
            conds.set(
                c.SUSPENDED,
                True,
                c.SUSPENDED_BY_USER,
                "spec.suspend is true; training resumes from the latest checkpoint when it is set back to false",
            )
        else:
            said = obs.queue_message(observed.workload)
            conds.set(
                c.SUSPENDED,
                True,
                c.WAITING_FOR_QUEUE,
                "waiting for the queue to admit the job" + (f": {said}" if said else ""),
            )
        conds.set(c.RUNNING, False, c.STOPPED, "suspended")
        return None
    if conds.get(c.SUSPENDED) is not None:
        conds.set(c.SUSPENDED, False, c.NOT_SUSPENDED, "running")

    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        conds.set(
            c.RUNNING,
            True,
            c.TRAINER_RUNNING,
            f"pod {obs.newest(running)['metadata']['name']} is training",
        )
        return None
    if any((p.get("status") or {}).get("phase") == "Succeeded" for p in pods):
        # The trainer is done and the Job controller has not marked the Job complete
        # yet: the condition stays as it was (no flash of "pending" in between).
        return None
    waiting_reason = failures.unschedulable(pods)
    if waiting_reason:
        conds.set(c.RUNNING, False, c.UNSCHEDULABLE, waiting_reason)
    elif any(obs.was_disrupted(p) for p in pods):
        conds.set(
            c.RUNNING,
            False,
            c.PREEMPTED,
            "the trainer pod was preempted; it restarts from the latest checkpoint",
        )
    else:
        conds.set(c.RUNNING, False, c.POD_PENDING, "waiting for the trainer pod to start")
    return None


def _count_queue_preemptions(status: FineTuningJobStatus, workload: Obj | None) -> None:
    """Kueue's preemptions of the job's Workload, each counted once as a preemption: it
    suspends the Job, whose pods are then deleted without a DisruptionTarget condition."""
    seen = obs.queue_preemptions(workload)
    if seen > status.queue_preemptions:
        status.preemptions += seen - status.queue_preemptions
        status.queue_preemptions = seen


def _count_disruptions(status: FineTuningJobStatus, pods: list[Obj]) -> None:
    """Add each disrupted pod to the running total once. The pods counted are remembered
    while they exist (a preempted pod is soon deleted, and its replacement may be
    disrupted in turn), so the list stays as short as the pods in view."""

    def uid(pod: Obj) -> str:
        return pod["metadata"].get("uid") or pod["metadata"]["name"]

    present = {uid(p) for p in pods}
    counted = [u for u in status.counted_disruptions if u in present]
    new = [uid(p) for p in pods if obs.was_disrupted(p) and uid(p) not in counted]
    status.preemptions += len(new)
    status.counted_disruptions = counted + new


def _restart_all(
    status: FineTuningJobStatus,
    conds: c.Conditions,
    spec: FineTuningJobSpec,
    job: dict,
    pods: list[dict],
    failure: Failure,
) -> Failure | None:
    """A multi-pod attempt ended when one of its pods did: count it once (a retry, or a
    preemption when a pod was disrupted) and start all pods again, from the latest
    checkpoint, unless the retries are spent. The plan replaces the Job."""
    attempt = obs.restart_of(job)
    failure = failures.attempt_failure(pods) or failure
    if attempt == status.restarts:  # not counted yet: this runs again, late, or twice
        if any(obs.was_disrupted(p) for p in pods):
            status.preemptions += 1
        else:
            status.retries += 1
        if status.retries > spec.max_retries:
            failure.message = f"failed {status.retries} time(s), last error: {failure.message}"
            return failure
        status.restarts += 1
    nodes = spec.resources.nodes
    conds.set(
        c.RUNNING,
        False,
        c.RESTARTING,
        f"attempt {attempt + 1} ended ({failure.reason.value}: {failure.message[:300]}); "
        f"restarting all {nodes} pods from the latest checkpoint",
    )
    return None


def _metrics_message(metrics: dict[str, float]) -> str:
    if not metrics:
        return "training finished"
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    return f"training finished: {shown}"


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def next_check_in(
    status: FineTuningJobStatus, observed: Observed, settings: OperatorSettings
) -> timedelta | None:
    """When to look again without any event: image-pull deadlines pass silently."""
    if is_terminal(status):
        return None
    for condition in status.conditions:
        if condition.type == c.RUNNING and condition.reason == c.IMAGE_PULL_BACKOFF:
            return timedelta(seconds=max(1, settings.image_pull_timeout_seconds // 4))
    return None
