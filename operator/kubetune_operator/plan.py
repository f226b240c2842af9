"""Decide what to create, change or delete for one FineTuningJob (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune.api.finetuningjob import FineTuningJobSpec, FineTuningJobStatus, Phase
from kubetune.api.trainer import TrainerMode
from kubetune_operator import builders, naming
from kubetune_operator import conditions as c
from kubetune_operator import observed as obs
from kubetune_operator.observed import Obj, Observed
from kubetune_operator.registration import desired_registered_model
from kubetune_operator.settings import OperatorSettings


@dataclass
class Plan:
    """Changes that bring the cluster to what the FineTuningJob asks for."""

    create: list[Obj] = field(default_factory=list)
    set_train_suspend: bool | None = None
    # Under a queue, pausing is deactivating the Job's Workload (Kueue owns spec.suspend).
    set_workload_active: bool | None = None
    delete_train_job: bool = False
    wait_for_pods: bool = False  # delete the Job in the foreground: pods first
    delete_validate_job: bool = False
    register: Obj | None = None

    def empty(self) -> bool:
        return not (
            self.create
            or self.set_train_suspend is not None
            or self.set_workload_active is not None
            or self.delete_train_job
            or self.delete_validate_job
            or self.register
        )


def _finished(job: Obj) -> bool:
    return bool(obs.job_condition(job, "Complete") or obs.job_condition(job, "Failed"))


def plan(
    body: Obj,
    spec: FineTuningJobSpec,
    status: FineTuningJobStatus,
    observed: Observed,
    settings: OperatorSettings,
) -> Plan:
    result = Plan()
    conds = c.Conditions(status.conditions, 0, observed.now)
    train = observed.train_job

    if status.phase in (Phase.FAILED, Phase.CANCELLED):
        # Stop anything still running (cancelled, or failed while stuck pulling its image).
        if train is not None and not _finished(train):
            result.delete_train_job = True
        validate = observed.validate_job
        if validate is not None and not _finished(validate):
            result.delete_validate_job = True
        return result

    if conds.is_true(c.SUCCEEDED):
        if spec.registration.enabled and observed.registered_model is None:
            report = obs.result_report(observed)
            if report is not None:
                result.register = desired_registered_model(
                    body, spec, status, report, status.completion_time or observed.now
                )
        return result
    if status.phase == Phase.SUCCEEDED:
        return result

    if not conds.is_true(c.DATASET_VALIDATED):
        if observed.validate_job is None and spec.dataset.validate_first:
            result.create.append(
                builders.desired_job(body, spec, settings, TrainerMode.VALIDATE, suspend=False)
            )
        return result

    queued = naming.KUEUE_QUEUE_LABEL in (body["metadata"].get("labels") or {})
    if train is None and conds.reason(c.REGISTERED) == c.NAME_TAKEN:
        return result  # no GPUs for a model that could not be registered
    if train is None and spec.suspend and queued:
        return result  # created when resumed: Kueue would admit (unsuspend) it at once
    if train is None:
        if builders.multi_pod(spec):
            result.create.append(builders.desired_rendezvous_service(body))
        job = builders.desired_job(
            body,
            spec,
            settings,
            TrainerMode.TRAIN,
            suspend=spec.suspend or queued,
            restart=status.restarts,
        )
        result.create.append(job)
        return result

    if train["metadata"].get("deletionTimestamp"):
        return result  # an attempt being replaced: its pods go first
    if builders.multi_pod(spec) and obs.restart_of(train) < status.restarts:
        # The attempt ended early (see status._restart_all): all its pods go, and the
        # next attempt starts them together once they are gone.
        result.delete_train_job = True
        result.wait_for_pods = True
        return result

    if not builders.spec_applied(train, spec) and not obs.training_began(
        train, observed.train_pods
    ):
        # The spec changed before training began (pods may be Pending): the Job's pod
        # template is immutable, so start over with a new Job.
        result.delete_train_job = True
        return result

    if queued and observed.workload is not None:
        # Kueue suspends and resumes a Job it manages: kubetune pauses one by deactivating
        # its Workload (which frees the quota) and resumes it by activating it again.
        active = obs.workload_active(observed.workload)
        if spec.suspend == active:
            result.set_workload_active = not spec.suspend
        return result
    suspended = bool((train.get("spec") or {}).get("suspend"))
    if spec.suspend and not suspended:
        result.set_train_suspend = True
    elif not spec.suspend and suspended and not queued:
        # With a queue, admission (unsuspending) is the queue's decision.
        result.set_train_suspend = False
    return result
