"""The operator's writes to the API server for one FineTuningJob's children: typed
clients, reads that may find nothing, create-if-absent that adopts only the job's own
children, and events."""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune.api import GROUP, VERSION
from kubetune.api import finetuningjob as ftj
from kubetune.api import registeredmodel as rm
from kubetune_operator import conditions as c
from kubetune_operator import naming
from kubetune_operator import observed as obs
from kubetune_operator.cache import Cache
from kubetune_operator.observed import Obj
from kubetune_operator.reports import ReportStore

log = logging.getLogger("kubetune.operator")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class Clients:
    """The typed API groups the operator uses, on one ApiClient, and the watch caches
    it reads from."""

    api: client.ApiClient
    cache: Cache
    reports: ReportStore

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def plain(self, obj: Any) -> Obj:
        return self.api.sanitize_for_serialization(obj)


def get_or_none(read: Any, clients: Clients, name: str, namespace: str) -> Obj | None:
    try:
        return clients.plain(read(name, namespace))
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def get_custom(clients: Clients, namespace: str, plural: str, name: str) -> Obj | None:
    try:
        return clients.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def delete_job(clients: Clients, name: str, namespace: str, propagation: str) -> None:
    """Delete a Job; one already gone is fine."""
    try:
        clients.batch.delete_namespaced_job(name, namespace, propagation_policy=propagation)
    except ApiException as err:
        if err.status != 404:
            raise
    if propagation != "Foreground":  # in the foreground it stays until its pods are gone
        clients.cache.forget("Job", namespace, name)


def read_cached(clients: Clients, kind: str, namespace: str, name: str, spec_model, status_model):
    """(body, spec, status) of an object from the watch cache; None when it is gone or
    cannot be read (logged: a spec the schema let through but the models refuse)."""
    body = clients.cache.get(kind, namespace, name)
    if body is None:
        return None
    try:
        spec = spec_model.model_validate(body["spec"])
        status = status_model.model_validate(body.get("status") or {})
    except ValidationError as err:
        log.warning("%s %s/%s cannot be read (%s); not reconciled", kind, namespace, name, err)
        return None
    return body, spec, status


class Stale(Exception):
    """The cached object was older than the server's: reconcile again from a fresh copy."""


def write_status(clients: Clients, plural: str, body: Obj, status: dict) -> Obj | None:
    """Replace the object's status; None if the object is gone.

    Full status with nulls: a JSON merge patch then also clears what is gone. The
    resourceVersion makes it conditional: derived from a copy that is no longer
    current (the cache lags a user's edit, say), it is refused (Stale) rather than
    applied, and the cache gets the fresh copy."""
    meta = body["metadata"]
    patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
    try:
        updated = clients.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            meta["namespace"],
            plural,
            meta["name"],
            patch,
            field_manager=naming.FIELD_MANAGER,
        )
    except ApiException as err:
        if err.status == 409:
            fresh = get_custom(clients, meta["namespace"], plural, meta["name"])
            if fresh is not None:
                clients.cache.put(fresh)
            raise Stale(f"{meta['name']} changed since it was read") from err
        if err.status == 404:
            return None
        raise
    clients.cache.put(updated)
    return updated


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


def create_child(clients: Clients, obj: Obj, owner_uid: str) -> Obj:
    """Create if absent; returns the object as it now exists: ours, or one an earlier run
    made. An object of the same name that this job does not control is never adopted."""
    kind, namespace, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    if kind == rm.KIND:
        group, version = obj["apiVersion"].split("/")
        try:
            return _cached(
                clients,
                clients.custom.create_namespaced_custom_object(
                    group, version, namespace, rm.PLURAL, obj, field_manager=naming.FIELD_MANAGER
                ),
            )
        except ApiException as err:
            if err.status in (403, 422):
                raise _refusal(err, kind, name) from err
            if err.status != 409:
                raise
        # Whose record it is, the registration's status decides (sourceJob.uid).
        return _cached(
            clients,
            clients.custom.get_namespaced_custom_object(group, version, namespace, rm.PLURAL, name),
        )
    if kind == ftj.KIND:  # a sweep's trial
        group, version = obj["apiVersion"].split("/")

        def create(ns: str, body: Obj, field_manager: str) -> Obj:
            return clients.custom.create_namespaced_custom_object(
                group, version, ns, ftj.PLURAL, body, field_manager=field_manager
            )

        def read(child: str, ns: str) -> Obj:
            return clients.custom.get_namespaced_custom_object(
                group, version, ns, ftj.PLURAL, child
            )

        return _create_owned(clients, obj, owner_uid, create, read)
    create, read = {
        "Job": (clients.batch.create_namespaced_job, clients.batch.read_namespaced_job),
        "Service": (
            clients.core.create_namespaced_service,
            clients.core.read_namespaced_service,
        ),
    }[kind]
    return _create_owned(clients, obj, owner_uid, create, read)


def _create_owned(clients: Clients, obj: Obj, owner_uid: str, create, read) -> Obj:
    kind, namespace, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        return _cached(
            clients, clients.plain(create(namespace, obj, field_manager=naming.FIELD_MANAGER))
        )
    except ApiException as err:
        if err.status in (403, 422):
            raise _refusal(err, kind, name) from err
        if err.status != 409:
            raise
    existing = clients.plain(read(name, namespace))
    if not obs.controlled_by(existing, owner_uid):
        owner = "FineTuningSweep" if kind == ftj.KIND else "FineTuningJob"
        # A stranger, or a child of an earlier job of the same name that garbage
        # collection has not removed yet: taking it over would mix two jobs.
        raise CreateBlocked(
            c.NAME_CONFLICT,
            f"{kind} {name} already exists and is controlled by {obs.controller_of(existing)}, "
            f"not by this {owner}: kubetune does not adopt it, and creates its own once "
            "the name is free (delete that object, or give the job another name)",
        )
    return _cached(clients, existing)


def _cached(clients: Clients, obj: Obj) -> Obj:
    """Keep what a write answered: the next reconcile must not act on an older copy."""
    if obj.get("kind") in ("Job", rm.KIND, ftj.KIND):
        clients.cache.put(obj)
    return obj


def post_event(clients: Clients, body: Obj, kind: str, reason: str, message: str) -> None:
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
