"""The imperative shell: observe one FineTuningJob's world, apply the plan, write status.

Level-triggered and idempotent: it reads everything it needs each time, creates
only what is missing (a 409 means someone, perhaps an earlier run of this very
function, already did), and writes status only when it changed.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from kubetune.api import finetuningjob as ftj
from kubetune.api import registeredmodel as rm
from kubetune.api.finetuningjob import (
    Failure,
    FailureReason,
    FineTuningJobSpec,
    FineTuningJobStatus,
    Phase,
)
from kubetune_operator import conditions as c
from kubetune_operator import metrics, naming
from kubetune_operator import observed as obs
from kubetune_operator.children import (
    Blocked,
    Clients,
    CreateBlocked,
    Stale,
    create_child,
    delete_job,
    post_event,
    utcnow,
    write_status,
)
from kubetune_operator.observed import Obj, Observed
from kubetune_operator.plan import Plan, plan
from kubetune_operator.registration import registered_model_name
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.status import derive_status, is_terminal, next_check_in, summarise

log = logging.getLogger("kubetune.operator")

__all__ = ["Blocked", "Clients", "Stale", "reconcile"]


def observe(
    clients: Clients, body: Obj, spec: FineTuningJobSpec, status: FineTuningJobStatus
) -> Observed:
    """What the job's status and plan depend on, from the watch caches (no requests)."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    cache = clients.cache
    now = utcnow()
    if status.phase == Phase.SUCCEEDED:
        return Observed(now=now)  # a finished record: nothing left to look at
    jobs_by_name = {
        job["metadata"]["name"]: job
        for job in cache.children("Job", namespace, uid)
        if obs.controlled_by(job, uid)
    }
    train_job = jobs_by_name.get(naming.train_job_name(name))
    validate_job = jobs_by_name.get(naming.validate_job_name(name))
    if status.phase in (Phase.FAILED, Phase.CANCELLED):
        return Observed(now=now, train_job=train_job, validate_job=validate_job)

    pods = cache.children("Pod", namespace, uid)
    registered = None
    succeeded = obs.job_condition(train_job, "Complete") or any(
        cond.type == c.SUCCEEDED and cond.status == "True" for cond in status.conditions
    )
    if succeeded or (train_job is None and spec.registration.enabled):
        # Before training: is the name free? (No GPUs for a model that cannot be registered.)
        registered = cache.get(rm.KIND, namespace, registered_model_name(body, spec))

    def component(pod: Obj) -> str:
        return (pod["metadata"].get("labels") or {}).get(naming.LABEL_COMPONENT, "")

    workload = None
    if train_job is not None and train_job["metadata"].get("uid"):
        workloads = cache.children("Workload", namespace, train_job["metadata"]["uid"])
        workload = workloads[0] if workloads else None

    return Observed(
        now=now,
        validate_job=validate_job,
        train_job=train_job,
        validate_pods=[p for p in pods if component(p) == naming.COMPONENT_VALIDATOR],
        train_pods=[p for p in pods if component(p) == naming.COMPONENT_TRAINER],
        report=clients.reports.get(namespace, name, uid),
        registered_model=registered,
        workload=workload,
    )


def apply_plan(clients: Clients, body: Obj, changes: Plan, observed: Observed) -> Observed:
    """Make the planned changes; returns the observation updated with their results."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    uid = body["metadata"]["uid"]
    updates: dict[str, Any] = {}
    for obj in changes.create:
        created = create_child(clients, obj, uid)
        if obj["kind"] == "Job":
            key = (
                "train_job"
                if created["metadata"]["name"] == naming.train_job_name(name)
                else "validate_job"
            )
            updates[key] = created
    if changes.set_train_suspend is not None:
        updates["train_job"] = clients.plain(
            clients.batch.patch_namespaced_job(
                naming.train_job_name(name),
                namespace,
                {"spec": {"suspend": changes.set_train_suspend}},
                field_manager=naming.FIELD_MANAGER,
            )
        )
        clients.cache.put(updates["train_job"])
    if changes.set_workload_active is not None and observed.workload is not None:
        workload = observed.workload["metadata"]
        updates["workload"] = clients.custom.patch_namespaced_custom_object(
            naming.KUEUE_GROUP,
            naming.KUEUE_VERSION,
            namespace,
            "workloads",
            workload["name"],
            {"spec": {"active": changes.set_workload_active}},
            field_manager=naming.FIELD_MANAGER,
        )
        clients.cache.put(updates["workload"])
    if changes.delete_train_job:
        propagation = "Foreground" if changes.wait_for_pods else "Background"
        delete_job(clients, naming.train_job_name(name), namespace, propagation)
        if not changes.wait_for_pods:  # in the foreground, the Job stays until its pods go
            updates["train_job"] = None
            updates["train_pods"] = []
    if changes.delete_validate_job:
        delete_job(clients, naming.validate_job_name(name), namespace, "Background")
        updates["validate_job"] = None
        updates["validate_pods"] = []
    if changes.register is not None:
        updates["registered_model"] = create_child(clients, changes.register, uid)
    return replace(observed, **updates)


def _events(
    clients: Clients, body: Obj, before: FineTuningJobStatus, after: FineTuningJobStatus
) -> None:
    """An event when something happened: a condition became true (training started,
    succeeded, registered, ...) or a warning appeared. Intermediate states (pending,
    not suspended, validation skipped) are in the conditions, not worth a request."""
    old = {cond.type: (cond.status, cond.reason) for cond in before.conditions}
    for cond in after.conditions:
        if old.get(cond.type) == (cond.status, cond.reason) or cond.type == c.READY:
            continue  # (Ready repeats the others: no event of its own)
        warning = (
            cond.type == c.FAILED and cond.status == "True"
        ) or cond.reason in c.WARNING_REASONS
        happened = cond.status == "True" and cond.reason not in c.QUIET_REASONS
        if not (warning or happened):
            continue
        post_event(
            clients,
            body,
            "Warning" if warning else "Normal",
            cond.reason,
            cond.message or cond.type,
        )


def _invalid_spec_status(
    body: Obj, previous: FineTuningJobStatus, error: ValidationError
) -> FineTuningJobStatus:
    problems = "; ".join(
        f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5]
    )
    status = previous.model_copy(deep=True)
    conds = c.Conditions(previous.conditions, body["metadata"].get("generation", 1), utcnow())
    failure = Failure(reason=FailureReason.INVALID_SPEC, message=problems)
    conds.set(c.FAILED, True, failure.reason.value, failure.message)
    status.failure = failure
    status.observed_generation = body["metadata"].get("generation")
    return summarise(status, conds, Phase.FAILED)


def reconcile(
    clients: Clients, settings: OperatorSettings, namespace: str, name: str
) -> float | None:
    """Bring one FineTuningJob's children and status up to date.

    Returns seconds until it should be looked at again without an event (None: never).
    """
    started = time.monotonic()
    body = clients.cache.get(ftj.KIND, namespace, name)
    if body is None:
        return None  # deleted: owner references take its children with it
    previous = parse_status(body.get("status") or {})
    if previous is None:
        # Never guess: an empty status would train a finished job again.
        post_event(
            clients,
            body,
            "Warning",
            "StatusUnreadable",
            "the operator cannot read this job's status (written by another version?); "
            "it leaves the job alone until an operator that can read it runs",
        )
        return None
    try:
        spec = FineTuningJobSpec.model_validate(body["spec"])
    except ValidationError as err:
        if is_terminal(previous):
            return None  # a finished record stays as it ended
        status = _invalid_spec_status(body, previous, err)
        _write_status(clients, body, previous, status)
        return None

    observed = observe(clients, body, spec, previous)
    status = derive_status(body, spec, previous, observed, settings)
    changes = plan(body, spec, status, observed, settings)
    if not changes.empty():
        try:
            observed = apply_plan(clients, body, changes, observed)
        except CreateBlocked as blocked:
            observed = replace(observed, blocked=(blocked.reason, blocked.message))
        # Build on the status just derived: what the plan removed (a stuck Job
        # of a failed run, say) must not erase what was learnt from it.
        status = derive_status(body, spec, status, observed, settings)
    _write_status(clients, body, previous, status)
    metrics.observe_reconcile(namespace, name, status.phase.value, time.monotonic() - started)
    if observed.blocked is not None:
        raise Blocked(observed.blocked[1])
    if is_terminal(status):
        return None  # finished: only a change to the object brings it back
    delay = next_check_in(status, observed, settings)
    return delay.total_seconds() if delay else float(settings.resync_seconds)


def parse_status(raw: Obj) -> FineTuningJobStatus | None:
    """The recorded status, ignoring fields this version does not know (written by a
    newer operator before a rollback, say); None when what it knows cannot be read."""
    try:
        return FineTuningJobStatus.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
    # pydantic reports every unknown field at once: drop them all, then read again.
    if not all(e["type"] == "extra_forbidden" for e in errors):
        log.error("unreadable status: %s", errors[:3])
        return None
    known = copy.deepcopy(raw)
    for error in errors:
        document = known
        *parents, field = error["loc"]
        for key in parents:
            document = document[key]
        document.pop(field, None)
    try:
        return FineTuningJobStatus.model_validate(known)
    except ValidationError as err:
        log.error("unreadable status: %s", err.errors()[:3])
        return None


def _write_status(
    clients: Clients, body: Obj, previous: FineTuningJobStatus, status: FineTuningJobStatus
) -> None:
    if status.to_api() == previous.to_api():
        return
    meta = body["metadata"]
    if (
        write_status(clients, ftj.PLURAL, body, status.model_dump(mode="json", by_alias=True))
        is None
    ):
        return
    _events(clients, body, previous, status)
    log.info("%s/%s: %s", meta["namespace"], meta["name"], status.phase.value)
