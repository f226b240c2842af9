"""Leader election on a real Lease: one holder, a takeover only after the lease runs out
(or at once when the holder lets go), and a stale holder stops before the new one starts.
The electors get a clock the test moves, so nothing here waits for time to pass."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubetune_operator.leader import LeaderElector

from tests.support.kube import Kube


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def electors(kube: Kube, namespace: str, clock: Clock) -> tuple[LeaderElector, LeaderElector]:
    return tuple(
        LeaderElector(kube.api, namespace, "kubetune-operator", who, lease_seconds=15, now=clock)
        for who in ("replica-a", "replica-b")
    )


def holder(kube: Kube, namespace: str) -> str | None:
    lease = kube.api_coordination.read_namespaced_lease("kubetune-operator", namespace)
    return lease.spec.holder_identity


def test_one_replica_leads_and_another_takes_over_after_the_lease(
    kube: Kube, namespace: str
) -> None:
    clock = Clock()
    a, b = electors(kube, namespace, clock)
    assert a.try_acquire_or_renew() is True  # creates the Lease
    assert b.try_acquire_or_renew() is False
    assert holder(kube, namespace) == "replica-a"

    clock.advance(10)
    assert a.try_acquire_or_renew() is True  # renewed in time
    clock.advance(10)
    assert b.try_acquire_or_renew() is False  # 10 s since the renewal: still a's

    # a stops renewing (crashed, or cut off from the API server).
    clock.advance(4)
    assert not a.is_leader  # it stopped leading two thirds into its lease...
    assert b.try_acquire_or_renew() is False  # ...before anyone else may take over
    clock.advance(2)
    assert b.try_acquire_or_renew() is True
    assert holder(kube, namespace) == "replica-b"
    lease = kube.api_coordination.read_namespaced_lease("kubetune-operator", namespace)
    assert lease.spec.lease_transitions == 1
    assert a.try_acquire_or_renew() is False  # back again, it stands by


def test_a_clean_shutdown_hands_over_at_once(kube: Kube, namespace: str) -> None:
    clock = Clock()
    a, b = electors(kube, namespace, clock)
    assert a.try_acquire_or_renew() is True
    a.release()
    assert not a.is_leader
    assert b.try_acquire_or_renew() is True
    assert holder(kube, namespace) == "replica-b"
