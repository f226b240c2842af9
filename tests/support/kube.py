"""A typed Kubernetes client for tests, and waits built on watches (never sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch


@dataclass
class Kube:
    """Typed API groups bound to one cluster's kubeconfig."""

    api: client.ApiClient
    kubeconfig: Path

    @classmethod
    def from_kubeconfig(cls, path: Path, connections: int | None = None) -> Kube:
        """A client of the cluster; `connections` sizes its pool (set before the client
        exists: the pool is made with it)."""
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(path), client_configuration=configuration)
        if connections:
            configuration.connection_pool_maxsize = connections
        return cls(client.ApiClient(configuration), path)

    def impersonating(self, user: str) -> Kube:
        """The same cluster, acting as `user` (RBAC decides as for that user; the API
        server adds the group system:authenticated)."""
        configuration = client.Configuration()
        config.load_kube_config(
            config_file=str(self.kubeconfig), client_configuration=configuration
        )
        api = client.ApiClient(configuration)
        api.set_default_header("Impersonate-User", user)
        return Kube(api, self.kubeconfig)

    @property
    def admissionregistration(self) -> client.AdmissionregistrationV1Api:
        return client.AdmissionregistrationV1Api(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        return client.RbacAuthorizationV1Api(self.api)

    @property
    def api_coordination(self) -> client.CoordinationV1Api:
        return client.CoordinationV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def version(self) -> client.VersionApi:
        return client.VersionApi(self.api)


def _items(listing: Any) -> list[Any]:
    return listing["items"] if isinstance(listing, dict) else listing.items


def _list_version(listing: Any) -> str:
    return (
        listing["metadata"]["resourceVersion"]
        if isinstance(listing, dict)
        else listing.metadata.resource_version
    )


def _version(obj: Any) -> str:
    return (
        obj["metadata"]["resourceVersion"]
        if isinstance(obj, dict)
        else obj.metadata.resource_version
    )


def _uid(obj: Any) -> str:
    return obj["metadata"]["uid"] if isinstance(obj, dict) else obj.metadata.uid


def _brief(obj: Any) -> Any:
    """What matters of an object in a failure message: its name and status."""
    if isinstance(obj, dict):
        return {"name": obj.get("metadata", {}).get("name"), "status": obj.get("status")}
    if obj is not None and hasattr(obj, "status"):
        return {"name": obj.metadata.name, "status": obj.status}
    return obj


class WaitTimeout(AssertionError):
    """What was awaited did not happen in time; carries the last state seen."""


def wait_for(
    list_fn: Callable[..., Any],
    predicate: Callable[[Any], bool],
    *,
    timeout: float,
    describe: str = "condition",
    **list_kwargs: Any,
) -> Any:
    """Return the first object listed by `list_fn(**list_kwargs)` that satisfies `predicate`.

    Lists once, then watches from that list's resourceVersion until an added
    or modified object satisfies the predicate or `timeout` seconds pass.
    """
    deadline = time.monotonic() + timeout
    listing = list_fn(**list_kwargs)
    last: Any = None
    for item in _items(listing):
        last = item
        if predicate(item):
            return item
    resource_version = _list_version(listing)
    while (remaining := deadline - time.monotonic()) > 0:
        stream = watch.Watch().stream(
            list_fn,
            resource_version=resource_version,
            timeout_seconds=max(1, int(remaining)),
            **list_kwargs,
        )
        for event in stream:
            obj = event["object"]
            resource_version = _version(obj)
            if event["type"] in ("ADDED", "MODIFIED"):
                last = obj
                if predicate(obj):
                    return obj
            if time.monotonic() > deadline:
                break
    raise WaitTimeout(
        f"timed out after {timeout}s waiting for {describe}; last seen: {_brief(last)}"
    )


def wait_gone(
    list_fn: Callable[..., Any], *, timeout: float, describe: str = "objects", **list_kwargs: Any
) -> None:
    """Wait until `list_fn(**list_kwargs)` lists nothing (watching DELETED events)."""
    deadline = time.monotonic() + timeout
    listing = list_fn(**list_kwargs)
    present = {_uid(item) for item in _items(listing)}
    resource_version = _list_version(listing)
    while present and (remaining := deadline - time.monotonic()) > 0:
        stream = watch.Watch().stream(
            list_fn,
            resource_version=resource_version,
            timeout_seconds=max(1, int(remaining)),
            **list_kwargs,
        )
        for event in stream:
            obj = event["object"]
            resource_version = _version(obj)
            if event["type"] == "DELETED":
                present.discard(_uid(obj))
            elif event["type"] == "ADDED":
                present.add(_uid(obj))
            if not present or time.monotonic() > deadline:
                break
    if present:
        raise WaitTimeout(
            f"timed out after {timeout}s waiting for {describe} to go; {len(present)} left"
        )


def observe_unchanged(
    list_fn: Callable[..., Any],
    changed: Callable[[Any], bool],
    *,
    seconds: float,
    **list_kwargs: Any,
) -> None:
    """Assert that, for `seconds`, no listed object satisfies `changed` (bounded watch)."""
    listing = list_fn(**list_kwargs)
    for item in _items(listing):
        assert not changed(item), f"unexpected state: {item}"
    stream = watch.Watch().stream(
        list_fn,
        resource_version=_list_version(listing),
        timeout_seconds=max(1, int(seconds)),
        **list_kwargs,
    )
    deadline = time.monotonic() + seconds
    for event in stream:
        assert not changed(event["object"]), f"unexpected state: {event['object']}"
        if time.monotonic() > deadline:
            break


def wait_node_ready(kube: Kube, name: str, timeout: float = 60) -> None:
    wait_for(
        kube.core.list_node,
        lambda n: any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or []),
        field_selector=f"metadata.name={name}",
        timeout=timeout,
        describe=f"node {name} Ready",
    )
