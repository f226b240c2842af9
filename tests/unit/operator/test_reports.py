"""The report endpoint's decisions: who may report for which job, and what is kept."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiohttp.test_utils import TestClient, TestServer
from kubetune_operator import naming
from kubetune_operator.reports import PodIdentity, ReportEndpoint, ReportStore, identity_of

AUDIENCE = "kubetune-operator"
PROGRESS = {
    "step": 5,
    "totalSteps": 10,
    "epoch": 0.5,
    "loss": 1.25,
    "timestamp": "2026-12-01T00:00:00Z",
}


def review(authenticated=True, audiences=(AUDIENCE,), pod="run-1-train-abc", uid="pod-uid"):
    extra = {}
    if pod:
        extra = {
            "authentication.kubernetes.io/pod-name": [pod],
            "authentication.kubernetes.io/pod-uid": [uid],
        }
    return {
        "status": {
            "authenticated": authenticated,
            "audiences": list(audiences),
            "user": {"username": "system:serviceaccount:team-a:default", "extra": extra},
        }
    }


def test_a_review_names_the_pod_only_for_our_audience() -> None:
    assert identity_of(review(), AUDIENCE) == PodIdentity("team-a", "run-1-train-abc", "pod-uid")
    assert identity_of(review(authenticated=False), AUDIENCE) is None
    assert identity_of(review(audiences=("https://kubernetes.default.svc",)), AUDIENCE) is None
    assert identity_of(review(pod=None), AUDIENCE) is None  # not bound to a pod


def test_reports_of_an_earlier_job_of_the_same_name_are_not_seen() -> None:
    store = ReportStore()
    store.put("ns", "run-1", "uid-1", "progress", "{}")
    assert store.get("ns", "run-1", "uid-1") == {"progress": "{}"}
    assert store.get("ns", "run-1", "uid-2") == {}
    store.put("ns", "run-1", "uid-2", "result", "{}")
    assert store.get("ns", "run-1", "uid-2") == {"result": "{}"}


class FakeCache:
    def __init__(self, objects: dict) -> None:
        self.objects = objects

    def get(self, kind: str, namespace: str, name: str):
        return self.objects.get((kind, namespace, name))


class FakeReviewer:
    def __init__(self, identities: dict[str, PodIdentity]) -> None:
        self.identities = identities

    def review(self, token: str) -> PodIdentity | None:
        return self.identities.get(token)


def pod(name: str, uid: str, job_uid: str) -> dict:
    return {"metadata": {"name": name, "uid": uid, "labels": {naming.LABEL_JOB_UID: job_uid}}}


def scenario(leader: bool = True):
    cache = FakeCache(
        {
            ("FineTuningJob", "team-a", "run-1"): {"metadata": {"name": "run-1", "uid": "job-1"}},
            ("FineTuningJob", "team-a", "run-2"): {"metadata": {"name": "run-2", "uid": "job-2"}},
            ("Pod", "team-a", "run-1-train-abc"): pod("run-1-train-abc", "pod-uid", "job-1"),
        }
    )
    reviewer = FakeReviewer(
        {
            "good": PodIdentity("team-a", "run-1-train-abc", "pod-uid"),
            "old-pod": PodIdentity("team-a", "run-1-train-abc", "another-uid"),
            "elsewhere": PodIdentity("team-b", "run-1-train-abc", "pod-uid"),
        }
    )
    store, arrived = ReportStore(), []
    endpoint = ReportEndpoint(
        cache,
        store,
        reviewer,
        ThreadPoolExecutor(1),
        lambda key, kind: arrived.append((key, kind)),
        lambda: leader,
    )
    return endpoint, store, arrived


async def answers(endpoint: ReportEndpoint, requests: list[tuple[str, str | None, object]]):
    client = TestClient(TestServer(endpoint.application()))
    await client.start_server()
    try:
        statuses = []
        for path, token, body in requests:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await client.post(path, json=body, headers=headers)
            statuses.append(response.status)
        return statuses
    finally:
        await client.close()


def test_only_the_jobs_own_pods_may_report_and_only_valid_reports_are_kept() -> None:
    endpoint, store, arrived = scenario()
    path = "/v1/reports/team-a/run-1"
    statuses = asyncio.run(
        answers(
            endpoint,
            [
                (path, None, {"progress": PROGRESS}),  # no token
                (path, "forged", {"progress": PROGRESS}),  # TokenReview says no
                (path, "old-pod", {"progress": PROGRESS}),  # a pod of that name, but not this one
                (path, "elsewhere", {"progress": PROGRESS}),  # another namespace's pod
                ("/v1/reports/team-a/run-2", "good", {"progress": PROGRESS}),  # another job
                (path, "good", {"metrics": {}}),  # not a report
                (path, "good", {"progress": {"step": "many"}}),  # not a valid one
                (path, "good", {"progress": PROGRESS}),
            ],
        )
    )
    assert statuses == [401, 401, 403, 403, 403, 400, 400, 204]
    assert list(store.get("team-a", "run-1", "job-1")) == ["progress"]
    assert store.get("team-a", "run-2", "job-2") == {}
    assert arrived == [(("team-a", "run-1"), "progress")]


def test_a_standby_replica_sends_reports_to_the_leader() -> None:
    endpoint, store, _ = scenario(leader=False)
    statuses = asyncio.run(
        answers(endpoint, [("/v1/reports/team-a/run-1", "good", {"progress": PROGRESS})])
    )
    assert statuses == [503]
    assert store.get("team-a", "run-1", "job-1") == {}
