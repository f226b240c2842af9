"""Leader election on a coordination.k8s.io Lease: one replica reconciles, the others
stand by and take over when its lease runs out.

kopf's peering does not serve here: replicas of the same priority all freeze, and
it pauses only kopf's own handlers, not the work queue's workers. The rules are
client-go's leaderelection: the holder renews every `renew_seconds`; a replica
takes the lease over only when it has not been renewed for `lease_seconds`; every
write carries the resourceVersion it read, so of two replicas racing for it one
gets a 409. A leader that cannot renew within `lease_seconds` stops reconciling
before anyone else may start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

log = logging.getLogger("kubetune.operator")


def default_identity() -> str:
    """Unique per process: the pod name (hostname) and a random part for restarts."""
    return f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


def _micro_time(moment: datetime) -> datetime:
    """A Lease's MicroTime needs six fraction digits; the client writes datetimes with
    isoformat(), which leaves out a fraction of zero: never hand it one."""
    return moment.replace(microsecond=moment.microsecond or 1)


class LeaderElector:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_seconds: int = 15,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        # client-go's proportions: renew every third of the lease (5 s of 15); a standby
        # asks again every fifth of it, at most every 2 s.
        self.renew_seconds = lease_seconds / 3
        self.retry_seconds = min(2, lease_seconds / 5)
        self._now = now
        self._renewed: datetime | None = None  # when this replica last held the lease
        self.leading = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        """Held, with a margin: it stops leading a third of a lease before anyone else
        may take over (client-go's renew deadline)."""
        deadline = timedelta(seconds=self.lease_seconds * 2 / 3)
        return self._renewed is not None and self._now() - self._renewed < deadline

    def try_acquire_or_renew(self) -> bool:
        """One round against the API server; True while this replica holds the lease."""
        now = self._now()
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            return self._write(None, now, acquired=now, transitions=0)
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        renewed = spec.renew_time or spec.acquire_time
        duration = timedelta(seconds=spec.lease_duration_seconds or self.lease_seconds)
        if holder and holder != self.identity and renewed and now - renewed < duration:
            return False  # someone else leads and is alive
        mine = holder == self.identity
        return self._write(
            lease.metadata.resource_version,
            now,
            acquired=spec.acquire_time if mine and spec.acquire_time else now,
            transitions=(spec.lease_transitions or 0) + (0 if mine or not holder else 1),
        )

    def _body(self, spec: dict, resource_version: str | None) -> dict:
        metadata = {"name": self.name, "namespace": self.namespace}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version  # optimistic concurrency
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    def _write(
        self, resource_version: str | None, now: datetime, *, acquired: datetime, transitions: int
    ) -> bool:
        """Create the Lease (no version yet) or replace the version read; False when another
        replica wrote first (409)."""
        body = self._body(
            {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.lease_seconds,
                "acquireTime": _micro_time(acquired),
                "renewTime": _micro_time(now),
                "leaseTransitions": transitions,
            },
            resource_version,
        )
        try:
            if resource_version is None:
                self.coordination.create_namespaced_lease(self.namespace, body)
            else:
                self.coordination.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        self._renewed = now
        return True

    def release(self) -> None:
        """On a clean shutdown: let a standby take over at once, not after the lease."""
        if not self.is_leader:
            return
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
            if lease.spec and lease.spec.holder_identity == self.identity:
                spec = {
                    "leaseDurationSeconds": self.lease_seconds,
                    "leaseTransitions": lease.spec.lease_transitions or 0,
                }
                self.coordination.replace_namespaced_lease(
                    self.name, self.namespace, self._body(spec, lease.metadata.resource_version)
                )
        except (ApiException, HTTPError, OSError) as err:
            log.warning("could not release the lease: %s", err)
        self._renewed = None
        self.leading.clear()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                held = await loop.run_in_executor(None, self.try_acquire_or_renew)
            except (ApiException, HTTPError, OSError) as err:
                log.warning("leader election: %s", err)
                held = False
            leading = held or self.is_leader  # a failed renewal keeps it until the lease ends
            if leading and not self.leading.is_set():
                log.info("leading as %s (lease %s/%s)", self.identity, self.namespace, self.name)
                self.leading.set()
            elif not leading and self.leading.is_set():
                log.warning("lost the lease %s/%s; standing by", self.namespace, self.name)
                self.leading.clear()
            await asyncio.sleep(self.renew_seconds if leading else self.retry_seconds)
