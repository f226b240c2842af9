"""The imperative shell: observe one FineTuningJob's world, apply the plan, write status.

Level-triggered and idempotent: it reads everything it needs each time, creates
only what is missing (a 409 means someone, perhaps an earlier run of this very
function, already did), and writes status only when it changed.
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune.api import GROUP, VERSION
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
from kubetune_operator.observed import Obj, Observed
from kubetune_operator.plan import Plan, plan
from kubetune_operator.registration import registered_model_name
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.status import derive_status, is_terminal, next_check_in

log = logging.getLogger("kubetune.operator")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class Clients:
    """The typed API groups the operator uses, on one ApiClient."""

    api: client.ApiClient

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def plain(self, obj: Any) -> Obj:
        return self.api.sanitize_for_serialization(obj)


def observe(
    clients: Clients, body: Obj, spec: FineTuningJobSpec, status: FineTuningJobStatus
) -> Observed:
    """Read what the job's status and plan depend on, and nothing more.

    Children are created in a fixed order (ConfigMaps, ServiceAccount and RBAC,
    then Jobs), so once a training Job exists the others do too.
    """
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    now = utcnow()
    if status.phase == Phase.SUCCEEDED:
        return Observed(now=now)  # a finished record: nothing left to look at
    selector = f"{naming.LABEL_JOB_UID}={uid}"
    jobs = clients.plain(clients.batch.list_namespaced_job(namespace, label_selector=selector))
    jobs_by_name = {job["metadata"]["name"]: job for job in jobs["items"]}
    train_job = jobs_by_name.get(naming.train_job_name(name))
    validate_job = jobs_by_name.get(naming.validate_job_name(name))
    if status.phase in (Phase.FAILED, Phase.CANCELLED):
        return Observed(now=now, train_job=train_job, validate_job=validate_job)

    pods: list[Obj] = []
    if jobs_by_name:
        pods = clients.plain(clients.core.list_namespaced_pod(namespace, label_selector=selector))[
            "items"
        ]
    config_map = service_account = None
    if train_job is None:
        config_maps = clients.plain(
            clients.core.list_namespaced_config_map(namespace, label_selector=selector)
        )
        by_name = {cm["metadata"]["name"]: cm for cm in config_maps["items"]}
        config_map = by_name.get(naming.config_map_name(name))
        report_map = by_name.get(naming.report_config_map_name(name))
        accounts = clients.plain(
            clients.core.list_namespaced_service_account(namespace, label_selector=selector)
        )
        service_account = accounts["items"][0] if accounts["items"] else None
    else:
        report_map = _get(
            clients.core.read_namespaced_config_map,
            clients,
            naming.report_config_map_name(name),
            namespace,
        )

    registered = None
    succeeded = obs.job_condition(train_job, "Complete") or any(
        cond.type == c.SUCCEEDED and cond.status == "True" for cond in status.conditions
    )
    if succeeded or (train_job is None and spec.registration.enabled):
        # Before training: is the name free? (No GPUs for a model that cannot be registered.)
        registered = _get_custom(clients, namespace, rm.PLURAL, registered_model_name(body, spec))

    def component(pod: Obj) -> str:
        return (pod["metadata"].get("labels") or {}).get(naming.LABEL_COMPONENT, "")

    return Observed(
        now=now,
        validate_job=validate_job,
        train_job=train_job,
        validate_pods=[p for p in pods if component(p) == naming.COMPONENT_VALIDATOR],
        train_pods=[p for p in pods if component(p) == naming.COMPONENT_TRAINER],
        report=(report_map or {}).get("data") or {},
        config_map=config_map,
        report_config_map=report_map,
        service_account=service_account,
        registered_model=registered,
    )


def _get(read: Any, clients: Clients, name: str, namespace: str) -> Obj | None:
    try:
        return clients.plain(read(name, namespace))
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def _get_custom(clients: Clients, namespace: str, plural: str, name: str) -> Obj | None:
    try:
        return clients.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


class CreateBlocked(Exception):
    """A child cannot be created until someone acts: its name is held by an object this
    job does not control, or the API server refused it (quota, admission policy)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class Blocked(Exception):
    """Raised after the status says what blocks the job: retry with back-off."""


def _refusal(err: ApiException, kind: str, name: str) -> CreateBlocked:
    try:
        detail = json.loads(err.body or "{}").get("message") or err.reason
    except (TypeError, ValueError):
        detail = err.reason
    return CreateBlocked(
        c.CREATE_REFUSED,
        f"the API server refused to create {kind} {name} ({err.status} {err.reason}: "
        f"{str(detail)[:600]}); retrying with back-off",
    )


def _create(clients: Clients, obj: Obj, owner_uid: str) -> Obj:
    """Create if absent; returns the object as it now exists: ours, or one an earlier run
    made. An object of the same name that this job does not control is never adopted."""
    kind, namespace, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    if kind == rm.KIND:
        group, version = obj["apiVersion"].split("/")
        try:
            return clients.custom.create_namespaced_custom_object(
                group, version, namespace, rm.PLURAL, obj, field_manager=naming.FIELD_MANAGER
            )
        except ApiException as err:
            if err.status in (403, 422):
                raise _refusal(err, kind, name) from err
            if err.status != 409:
                raise
        # Whose record it is, the registration's status decides (sourceJob.uid).
        return clients.custom.get_namespaced_custom_object(
            group, version, namespace, rm.PLURAL, name
        )
    create, read = {
        "ConfigMap": (
            clients.core.create_namespaced_config_map,
            clients.core.read_namespaced_config_map,
        ),
        "ServiceAccount": (
            clients.core.create_namespaced_service_account,
            clients.core.read_namespaced_service_account,
        ),
        "Role": (clients.rbac.create_namespaced_role, clients.rbac.read_namespaced_role),
        "RoleBinding": (
            clients.rbac.create_namespaced_role_binding,
            clients.rbac.read_namespaced_role_binding,
        ),
        "Job": (clients.batch.create_namespaced_job, clients.batch.read_namespaced_job),
        "Service": (
            clients.core.create_namespaced_service,
            clients.core.read_namespaced_service,
        ),
    }[kind]
    try:
        return clients.plain(create(namespace, obj, field_manager=naming.FIELD_MANAGER))
    except ApiException as err:
        if err.status in (403, 422):
            raise _refusal(err, kind, name) from err
        if err.status != 409:
            raise
    existing = clients.plain(read(name, namespace))
    if not obs.controlled_by(existing, owner_uid):
        # A stranger, or a child of an earlier job of the same name that garbage
        # collection has not removed yet: taking it over would mix two jobs.
        raise CreateBlocked(
            c.NAME_CONFLICT,
            f"{kind} {name} already exists and is controlled by {obs.controller_of(existing)}, "
            "not by this FineTuningJob: kubetune does not adopt it, and creates its own once "
            "the name is free (delete that object, or give the job another name)",
        )
    return existing


def apply_plan(clients: Clients, body: Obj, changes: Plan, observed: Observed) -> Observed:
    """Make the planned changes; returns the observation updated with their results."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    uid = body["metadata"]["uid"]
    updates: dict[str, Any] = {}
    for obj in changes.create:
        created = _create(clients, obj, uid)
        if obj["kind"] == "Job":
            key = (
                "train_job"
                if created["metadata"]["name"] == naming.train_job_name(name)
                else "validate_job"
            )
            updates[key] = created
    if changes.replace_config is not None:
        cm = changes.replace_config
        clients.core.patch_namespaced_config_map(
            cm["metadata"]["name"],
            namespace,
            {"data": cm["data"]},
            field_manager=naming.FIELD_MANAGER,
        )
    if changes.set_train_suspend is not None:
        updates["train_job"] = clients.plain(
            clients.batch.patch_namespaced_job(
                naming.train_job_name(name),
                namespace,
                {"spec": {"suspend": changes.set_train_suspend}},
                field_manager=naming.FIELD_MANAGER,
            )
        )
    if changes.delete_train_job:
        propagation = "Foreground" if changes.wait_for_pods else "Background"
        try:
            clients.batch.delete_namespaced_job(
                naming.train_job_name(name), namespace, propagation_policy=propagation
            )
        except ApiException as err:
            if err.status != 404:
                raise
        if not changes.wait_for_pods:  # in the foreground, the Job stays until its pods go
            updates["train_job"] = None
            updates["train_pods"] = []
    if changes.delete_validate_job:
        try:
            clients.batch.delete_namespaced_job(
                naming.validate_job_name(name), namespace, propagation_policy="Background"
            )
        except ApiException as err:
            if err.status != 404:
                raise
        updates["validate_job"] = None
        updates["validate_pods"] = []
    if changes.register is not None:
        updates["registered_model"] = _create(clients, changes.register, uid)
    return replace(observed, **updates)


def _events(
    clients: Clients, body: Obj, before: FineTuningJobStatus, after: FineTuningJobStatus
) -> None:
    """One event per condition transition (status or reason changed)."""
    old = {cond.type: (cond.status, cond.reason) for cond in before.conditions}
    for cond in after.conditions:
        if old.get(cond.type) == (cond.status, cond.reason):
            continue
        warning = (
            cond.type == c.FAILED and cond.status == "True"
        ) or cond.reason in c.WARNING_REASONS
        _post_event(
            clients,
            body,
            "Warning" if warning else "Normal",
            cond.reason,
            cond.message or cond.type,
        )


def _post_event(clients: Clients, body: Obj, kind: str, reason: str, message: str) -> None:
    meta = body["metadata"]
    now = utcnow()
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(
            name=f"{meta['name'][:200]}.{secrets.token_hex(8)}", namespace=meta["namespace"]
        ),
        involved_object=client.V1ObjectReference(
            api_version=body["apiVersion"],
            kind=body["kind"],
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            resource_version=meta.get("resourceVersion"),
        ),
        reason=reason,
        message=message[:1024],
        type=kind,
        first_timestamp=now,
        last_timestamp=now,
        count=1,
        source=client.V1EventSource(component=naming.MANAGER),
        reporting_component=naming.MANAGER,
        reporting_instance=naming.MANAGER,
    )
    try:
        clients.core.create_namespaced_event(meta["namespace"], event)
    except ApiException as err:  # events are best effort
        log.warning("could not post event %s for %s: %s", reason, meta["name"], err.reason)


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
    status.conditions = conds.as_list()
    status.phase = Phase.FAILED
    status.observed_generation = body["metadata"].get("generation")
    return status


def reconcile(
    clients: Clients, settings: OperatorSettings, namespace: str, name: str
) -> float | None:
    """Bring one FineTuningJob's children and status up to date.

    Returns seconds until it should be looked at again without an event (None: never).
    """
    started = time.monotonic()
    try:
        body = clients.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, ftj.PLURAL, name
        )
    except ApiException as err:
        if err.status == 404:
            return None  # deleted: owner references take its children with it
        raise
    previous = parse_status(body.get("status") or {})
    if previous is None:
        # Never guess: an empty status would train a finished job again.
        _post_event(
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
    candidate = copy.deepcopy(raw)
    for _ in range(50):
        try:
            return FineTuningJobStatus.model_validate(candidate)
        except ValidationError as err:
            unknown = [e["loc"] for e in err.errors() if e["type"] == "extra_forbidden"]
            if not unknown or len(unknown) != len(err.errors()):
                log.error("unreadable status: %s", err.errors()[:3])
                return None
            for loc in unknown:
                _drop(candidate, loc)
    return None


def _drop(document: Any, loc: tuple) -> None:
    for key in loc[:-1]:
        document = document[key]
    if isinstance(document, dict):
        document.pop(loc[-1], None)


def _write_status(
    clients: Clients, body: Obj, previous: FineTuningJobStatus, status: FineTuningJobStatus
) -> None:
    if status.to_api() == previous.to_api():
        return
    meta = body["metadata"]
    # Full status with nulls: a JSON merge patch then also clears what is gone.
    patch = {"status": status.model_dump(mode="json", by_alias=True)}
    clients.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        meta["namespace"],
        ftj.PLURAL,
        meta["name"],
        patch,
        field_manager=naming.FIELD_MANAGER,
    )
    _events(clients, body, previous, status)
    log.info("%s/%s: %s", meta["namespace"], meta["name"], status.phase.value)
