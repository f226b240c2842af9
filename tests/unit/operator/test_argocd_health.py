"""The Argo CD health check against the status documents the operator writes."""

from __future__ import annotations

from kubetune_operator import naming

from tests.support.argocd import health
from tests.unit.operator.conftest import SPEC, condition, job, make_body, pod
from tests.unit.operator.test_status import RESULT, derive, validated_job


def document(body: dict, status) -> dict:
    return {**body, "status": status.model_dump(mode="json", by_alias=True, exclude_none=True)}


def test_each_phase_has_the_health_argo_cd_users_expect() -> None:
    body = make_body()
    validating = derive(body)
    running = derive(
        body,
        validate_job=validated_job(),
        train_job=job("run-1-train", start=True),
        train_pods=[pod("t", "Running")],
    )
    done = job("run-1-train", conditions=[condition("Complete")], start=True)
    result = {"result": RESULT.model_dump_json(by_alias=True)}
    registering = derive(body, validate_job=validated_job(), train_job=done, report=result)
    registered = {"metadata": {"name": "run-1"}, "spec": {"sourceJob": {"uid": "uid-1"}}}
    succeeded = derive(
        body,
        registering,
        validate_job=validated_job(),
        train_job=done,
        report=result,
        registered_model=registered,
    )
    failed_job = job("run-1-train", conditions=[condition("Failed", reason="BackoffLimitExceeded")])
    failed = derive(
        body,
        validate_job=validated_job(),
        train_job=failed_job,
        train_pods=[pod("t", "Failed", terminated={"exitCode": 1})],
    )
    suspended_body = make_body(dict(SPEC, suspend=True))
    suspended = derive(
        suspended_body,
        validate_job=validated_job(),
        train_job=job("run-1-train", suspend=True),
    )
    queued_body = make_body(labels={naming.KUEUE_QUEUE_LABEL: "q"})
    queued = derive(
        queued_body, validate_job=validated_job(), train_job=job("run-1-train", suspend=True)
    )
    cancelled_body = make_body(dict(SPEC, cancel=True))
    cancelled = derive(cancelled_body, validate_job=validated_job())

    cases = {
        "validating": (document(body, validating), "Progressing", "Validating"),
        "running": (document(body, running), "Progressing", "Running: pod t is training"),
        "registering": (document(body, registering), "Progressing", "Running"),
        "succeeded": (document(body, succeeded), "Healthy", "Succeeded"),
        "failed": (document(body, failed), "Degraded", "Failed"),
        "suspended": (document(suspended_body, suspended), "Suspended", "Suspended"),
        "queued": (document(queued_body, queued), "Suspended", "Queued"),
        "cancelled": (document(cancelled_body, cancelled), "Degraded", "Cancelled"),
    }
    for name, (obj, expected, message) in cases.items():
        status, text = health(obj)
        assert status == expected, name
        assert text.startswith(message), (name, text)


def test_an_edit_the_operator_has_not_seen_is_progressing() -> None:
    body = make_body()
    succeeded_earlier = derive(body)
    obj = document(body, succeeded_earlier)
    obj["metadata"]["generation"] = 2
    assert health(obj)[0] == "Progressing"
    assert health({"metadata": {"generation": 1}})[0] == "Progressing"  # no status yet
