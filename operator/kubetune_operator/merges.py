"""The imperative shell of a ModelMerge: find its parents, check them, run the merge
Job, register the merged model, write status.

Level-triggered like the rest: the merged RegisteredModel, once it exists, is the
proof that the merge is done (a restart between its create and the status write
loses nothing); the Job is created if absent under a name fixed by the merge's,
and a Job of that name that this merge does not control is never adopted.
"""

from __future__ import annotations

import logging

from kubetune.api import merge as mm
from kubetune.api import registeredmodel as rm
from kubetune.api.merge import MergePhase, ModelMergeSpec, ModelMergeStatus
from kubetune_operator import conditions as c
from kubetune_operator import naming
from kubetune_operator import observed as obs
from kubetune_operator.children import (
    Clients,
    CreateBlocked,
    create_child,
    post_event,
    read_cached,
    utcnow,
    write_status,
)
from kubetune_operator.conditions import Conditions
from kubetune_operator.merge_plan import (
    desired_merge_job,
    desired_merged_model,
    incompatibility,
    made_by,
    merged_model_name,
    parse_time,
    resolve_parents,
)
from kubetune_operator.observed import Obj
from kubetune_operator.settings import OperatorSettings

log = logging.getLogger("kubetune.operator")

WAIT_FOR_MODELS_SECONDS = 15.0
RESYNC_SECONDS = 60.0
BLOCKED_SECONDS = 30.0  # a name held by another object, a create refused: someone must act


def reconcile_merge(
    clients: Clients, settings: OperatorSettings, namespace: str, name: str
) -> float | None:
    read = read_cached(clients, mm.KIND, namespace, name, ModelMergeSpec, ModelMergeStatus)
    if read is None:
        return None
    body, spec, previous = read
    meta = body["metadata"]
    status = previous.model_copy(deep=True)
    status.observed_generation = meta.get("generation", 1)
    conds = Conditions(previous.conditions, status.observed_generation, utcnow())
    again = _advance(clients, settings, body, spec, status, conds)
    status.phase = _phase(conds)
    done = status.phase in (MergePhase.SUCCEEDED, MergePhase.FAILED)
    if done and status.completion_time is None:
        status.completion_time = utcnow()
    conds.set(
        c.READY,
        status.phase == MergePhase.SUCCEEDED,
        status.phase.value,
        f"RegisteredModel {status.registered_model} records the merged model"
        if status.phase == MergePhase.SUCCEEDED
        else _message(conds),
    )
    status.conditions = conds.as_list()
    if status.phase != previous.phase or not previous.conditions:
        _announce(clients, body, status, conds)
    if status.to_api() != previous.to_api():
        write_status(clients, mm.PLURAL, body, status.model_dump(mode="json", by_alias=True))
    return None if done else again


def _advance(clients, settings, body, spec, status, conds) -> float:
    """One look: what exists decides the next step. Returns when to look again."""
    cache = clients.cache
    meta = body["metadata"]
    namespace, uid = meta["namespace"], meta["uid"]
    if conds.is_true(c.FAILED):
        return RESYNC_SECONDS  # final: the spec cannot change
    model_name = merged_model_name(body, spec)
    model = cache.get(rm.KIND, namespace, model_name)
    if model is not None and made_by(model, uid):
        _succeeded(status, conds, model)
        return RESYNC_SECONDS
    if model is not None:  # said before any pod runs, not after
        conds.set(c.REGISTERED, False, c.NAME_TAKEN, _name_taken(model_name))
        return BLOCKED_SECONDS
    registered = {s.model: cache.get(rm.KIND, namespace, s.model) for s in spec.models}
    parents, missing, unreadable = resolve_parents(spec, registered)
    if missing:
        conds.set(
            c.MODELS_READY,
            False,
            c.MODEL_NOT_FOUND,
            f"waiting for RegisteredModel {', '.join(missing)} in namespace {namespace}: "
            "the merge starts once every model in spec.models is registered",
        )
        return WAIT_FOR_MODELS_SECONDS
    if unreadable:
        message = f"the record of RegisteredModel {', '.join(unreadable)} cannot be read"
        conds.set(c.MODELS_READY, False, c.MODEL_UNREADABLE, message)
        conds.set(c.FAILED, True, c.MODEL_UNREADABLE, message)
        return RESYNC_SECONDS
    problem = incompatibility(spec, parents)
    if problem is not None:
        conds.set(c.MODELS_READY, False, c.INCOMPATIBLE_MODELS, problem)
        conds.set(c.FAILED, True, c.INCOMPATIBLE_MODELS, problem)
        return RESYNC_SECONDS
    conds.set(
        c.MODELS_READY,
        True,
        c.MODELS_COMPATIBLE,
        f"{len(parents)} models of {parents[0].spec.base_model.name} to merge with "
        f"{spec.method.value}",
    )
    job_name = naming.merge_job_name(meta["name"])
    job = next(
        (j for j in cache.children("Job", namespace, uid) if j["metadata"]["name"] == job_name),
        None,
    )
    if job is None:
        try:
            job = create_child(clients, desired_merge_job(body, spec, parents, settings), uid)
        except CreateBlocked as blocked:
            conds.set(c.RUNNING, False, blocked.reason, blocked.message)
            return BLOCKED_SECONDS
        log.info("merge %s/%s: Job %s created", namespace, meta["name"], job_name)
    status.job_name = job_name
    status.start_time = status.start_time or parse_time((job.get("status") or {}).get("startTime"))
    pod = obs.newest([p for p in cache.children("Pod", namespace, uid) if _pod_of(p, job)])
    termination, raw = obs.termination_of(pod)
    if obs.job_condition(job, "Failed"):
        error = termination.error if termination and termination.error else None
        reason = error.reason if error else c.MERGE_FAILED
        message = error.message if error else (raw[-1000:] or "the merge pod failed")
        conds.set(c.RUNNING, False, c.MERGE_FAILED, message)
        conds.set(c.FAILED, True, reason, message)
        return RESYNC_SECONDS
    if not obs.job_condition(job, "Complete"):
        conds.set(c.RUNNING, True, c.MERGE_RUNNING, f"Job {job_name} merges the models")
        return RESYNC_SECONDS
    report = termination.merge if termination else None
    if report is None:
        message = "the merge Job completed without a report in its pod's termination message"
        conds.set(c.FAILED, True, c.MERGE_FAILED, message)
        return RESYNC_SECONDS
    image = ((pod or {}).get("spec") or {}).get("containers", [{}])[0].get("image", "")
    desired = desired_merged_model(body, spec, parents, report, image or "")
    try:
        model = create_child(clients, desired, uid)
    except CreateBlocked as blocked:
        conds.set(c.REGISTERED, False, blocked.reason, blocked.message)
        return BLOCKED_SECONDS
    if not made_by(model, uid):
        where = desired["spec"]["artifact"]["volume"]
        message = f"{_name_taken(model_name)}; the merged weights stay at {where}"
        conds.set(c.REGISTERED, False, c.NAME_TAKEN, message)
        return BLOCKED_SECONDS
    _succeeded(status, conds, model)
    return RESYNC_SECONDS


def _name_taken(name: str) -> str:
    return (
        f"RegisteredModel {name} already records another model: delete it, or create the "
        "merge again with another spec.modelName; the merge runs once the name is free"
    )


def _pod_of(pod: Obj, job: Obj) -> bool:
    owners = pod["metadata"].get("ownerReferences") or []
    uid = job["metadata"].get("uid")
    return not owners or any(o.get("uid") == uid for o in owners)


def _succeeded(status: ModelMergeStatus, conds: Conditions, model: Obj) -> None:
    name = model["metadata"]["name"]
    status.registered_model = name
    status.digest = model["spec"]["artifact"]["digest"]
    conds.set(c.RUNNING, False, c.MERGE_COMPLETE, "the merge Job completed")
    conds.set(c.SUCCEEDED, True, c.MERGE_COMPLETE, f"merged into RegisteredModel {name}")
    conds.set(c.REGISTERED, True, c.MODEL_REGISTERED, f"RegisteredModel {name}")


def _phase(conds: Conditions) -> MergePhase:
    """A display summary of the conditions."""
    if conds.is_true(c.SUCCEEDED):
        return MergePhase.SUCCEEDED
    if conds.is_true(c.FAILED):
        return MergePhase.FAILED
    if conds.is_true(c.RUNNING):
        return MergePhase.RUNNING
    return MergePhase.PENDING


def _message(conds: Conditions) -> str:
    """What the merge waits for or why it failed, from the most telling condition."""
    for type_ in (c.FAILED, c.REGISTERED, c.MODELS_READY, c.RUNNING):
        condition = conds.get(type_)
        if condition is not None and (type_ != c.MODELS_READY or condition.status != "True"):
            if type_ == c.REGISTERED and condition.status == "True":
                continue
            return condition.message
    return ""


def _announce(clients: Clients, body: Obj, status: ModelMergeStatus, conds: Conditions) -> None:
    reason = {
        MergePhase.SUCCEEDED: "MergeSucceeded",
        MergePhase.FAILED: "MergeFailed",
        MergePhase.RUNNING: "MergeStarted",
        MergePhase.PENDING: "MergePending",
    }[status.phase]
    kind = "Warning" if status.phase in (MergePhase.FAILED, MergePhase.PENDING) else "Normal"
    message = (
        f"merged into RegisteredModel {status.registered_model}"
        if status.phase == MergePhase.SUCCEEDED
        else _message(conds)
    )
    post_event(clients, body, kind, reason, message or status.phase.value)
