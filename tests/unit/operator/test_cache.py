"""The watch caches' store and the client's rate limit (pure parts)."""

from __future__ import annotations

import pytest
from kubetune_operator import naming
from kubetune_operator.apiclient import TokenBucket, retry_after_seconds
from kubetune_operator.cache import Resource, Store, slim


def obj(name: str, rv: str, namespace: str = "ns", uid: str | None = "u1") -> dict:
    labels = {naming.LABEL_JOB_UID: uid} if uid else {}
    return {
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": rv,
            "labels": labels,
            "managedFields": [{"manager": "x"}],
        },
    }


def test_an_older_copy_never_replaces_a_newer_one() -> None:
    store = Store()
    assert store.put(obj("a", "10"))
    assert not store.put(obj("a", "9"))  # a late watch event after our own write
    assert store.get("ns", "a")["metadata"]["resourceVersion"] == "10"
    assert store.put(obj("a", "11"))
    assert store.get("ns", "a")["metadata"]["resourceVersion"] == "11"


def test_children_are_indexed_by_job_uid_and_follow_relabels() -> None:
    store = Store()
    store.put(obj("a", "1", uid="u1"))
    store.put(obj("b", "2", uid="u1"))
    store.put(obj("c", "3", uid="u2"))
    store.put(obj("d", "4", namespace="other", uid="u1"))
    assert [o["metadata"]["name"] for o in store.children("ns", "u1")] == ["a", "b"]
    store.put(obj("b", "5", uid="u2"))
    assert [o["metadata"]["name"] for o in store.children("ns", "u2")] == ["b", "c"]
    store.remove("ns", "a")
    assert store.children("ns", "u1") == []
    assert len(store) == 3


def test_a_relist_of_one_namespace_reports_what_went_and_keeps_the_others() -> None:
    store = Store()
    store.put(obj("a", "1"))
    store.put(obj("b", "2"))
    store.put(obj("x", "3", namespace="other"))
    gone = store.replace([obj("b", "7")], "ns")
    assert [o["metadata"]["name"] for o in gone] == ["a"]
    assert store.get("ns", "b")["metadata"]["resourceVersion"] == "7"
    assert store.get("other", "x") is not None
    assert [o["metadata"]["name"] for o in store.children("ns", "u1")] == ["b"]


def test_cached_objects_drop_managed_fields() -> None:
    assert "managedFields" not in slim(obj("a", "1"))["metadata"]


def test_watch_paths() -> None:
    jobs = Resource("Job", "batch", "v1", "jobs")
    assert jobs.path(None) == "/apis/batch/v1/jobs"
    assert jobs.path("ns") == "/apis/batch/v1/namespaces/ns/jobs"
    assert Resource("Pod", "", "v1", "pods").path("ns") == "/api/v1/namespaces/ns/pods"


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=50, burst=3, clock=lambda: now[0], sleep=lambda s: None)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.02)  # in debt: wait for the next token
    now[0] += 1.0  # a quiet second refills the bucket, but only up to the burst
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() > 0
    assert TokenBucket(rate=0, burst=1).take() == 0.0  # no limit


def test_retry_after_is_bounded() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) == 1.0
    assert retry_after_seconds("soon") == 1.0
    assert retry_after_seconds("3600") == 10.0


def test_cached_pods_and_jobs_keep_only_what_is_read() -> None:
    from kubetune_operator import builders
    from kubetune_operator.settings import OperatorSettings

    from kubetune.api.trainer import TrainerMode
    from tests.unit.operator.conftest import make_body, parse

    body = make_body()
    job = builders.desired_job(
        body, parse(body), OperatorSettings(), TrainerMode.TRAIN, suspend=True
    )
    kept = slim(job)
    assert kept["spec"]["suspend"] is True
    assert kept["spec"]["template"] == {
        "spec": {"containers": [{"name": "trainer", "image": OperatorSettings().trainer_image}]}
    }
    assert naming.ANNOTATION_SPEC_HASH in kept["metadata"]["annotations"]  # spec_applied reads it
    pod = {
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "annotations": {
                naming.ANNOTATION_TRAINER_CONFIG: "{...}",
                naming.ANNOTATION_OWNER: "o",
            },
        },
        "spec": {"containers": [{"name": "trainer", "image": "i", "env": [{"name": "X"}]}]},
        "status": {"phase": "Running"},
    }
    assert slim(pod) == {
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {naming.ANNOTATION_OWNER: "o"}},
        "spec": {"containers": [{"name": "trainer", "image": "i"}]},
        "status": {"phase": "Running"},
    }
