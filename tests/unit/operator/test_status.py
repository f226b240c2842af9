"""Status derivation, failure classification and planning, from observed objects."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from kubetune_operator import builders, naming
from kubetune_operator import conditions as c
from kubetune_operator.observed import Observed
from kubetune_operator.plan import plan
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.status import derive_status, format_duration

from kubetune.api.finetuningjob import FineTuningJobStatus, Phase
from kubetune.api.trainer import (
    ErrorReport,
    ProgressReport,
    ResultArtifact,
    ResultReport,
    TrainerMode,
    TrainerTermination,
    ValidationReport,
)
from tests.unit.operator.conftest import NOW, SPEC, condition, job, make_body, parse, pod

SETTINGS = OperatorSettings(image_pull_timeout_seconds=60)


def derive(body, previous=None, **observed):
    observed.setdefault("now", NOW)
    return derive_status(
        body, parse(body), previous or FineTuningJobStatus(), Observed(**observed), SETTINGS
    )


def conds(status):
    return {cond.type: cond for cond in status.conditions}


def validated_job():
    return job("run-1-validate", conditions=[condition("Complete")])


def termination(**kwargs) -> str:
    return TrainerTermination(**kwargs).model_dump_json(by_alias=True, exclude_none=True)


RESULT = ResultReport(
    artifact=ResultArtifact(path="model", kind="adapter", digest="sha256:abc"),
    metrics={"train_loss": 1.5, "eval_loss": 1.7},
    dataset_digest="sha256:data",
    completed_at=NOW,
)


def test_new_job_is_validating() -> None:
    status = derive(make_body())
    assert status.phase == Phase.VALIDATING
    assert conds(status)[c.DATASET_VALIDATED].status == "Unknown"
    assert status.observed_generation == 1
    assert status.hyperparameters.batch_size > 0


def test_validation_report_reaches_the_condition() -> None:
    report = ValidationReport(
        rows_read=120, rows_kept=100, train_rows=90, eval_rows=10, tokens=5000, digest="sha256:d"
    )
    validate_pod = pod(
        "v",
        "Succeeded",
        component="dataset-validator",
        terminated={"exitCode": 0, "message": termination(validation=report)},
    )
    status = derive(make_body(), validate_job=validated_job(), validate_pods=[validate_pod])
    validated = conds(status)[c.DATASET_VALIDATED]
    assert validated.status == "True"
    assert "100 of 120 rows kept" in validated.message
    assert status.dataset_digest == "sha256:d"


def test_invalid_dataset_fails_before_training() -> None:
    error = ErrorReport(reason="InvalidDataset", message="row 7: field 'a' is missing")
    failed = job("run-1-validate", conditions=[condition("Failed", "PodFailurePolicy")])
    validate_pod = pod(
        "v",
        "Failed",
        component="dataset-validator",
        terminated={"exitCode": 65, "message": termination(error=error)},
    )
    status = derive(make_body(), validate_job=failed, validate_pods=[validate_pod])
    assert status.phase == Phase.FAILED
    assert status.failure.reason == "InvalidDataset"
    assert status.failure.message == "row 7: field 'a' is missing"
    assert conds(status)[c.DATASET_VALIDATED].status == "False"
    # No training Job is planned once failed.
    assert plan(make_body(), parse(make_body()), status, Observed(now=NOW), SETTINGS).create == []


def test_progress_and_eta_from_the_report() -> None:
    progress = ProgressReport(
        step=120,
        total_steps=600,
        epoch=0.4,
        loss=1.25,
        tokens_per_second=900.0,
        eta_seconds=3725,
        timestamp=NOW,
    )
    running = pod("t", "Running")
    status = derive(
        make_body(),
        validate_job=validated_job(),
        train_job=job("run-1-train", start=True),
        train_pods=[running],
        report={"progress": progress.model_dump_json(by_alias=True)},
    )
    assert status.phase == Phase.RUNNING
    assert status.progress.steps == "120/600"
    assert status.progress.percent == 20
    assert status.progress.eta == "1h2m"
    assert status.progress.loss == 1.25
    assert status.start_time is not None


def test_success_records_metrics_and_waits_for_registration() -> None:
    done = job("run-1-train", conditions=[condition("Complete")], start=True)
    observed = dict(
        validate_job=validated_job(),
        train_job=done,
        report={"result": RESULT.model_dump_json(by_alias=True)},
    )
    status = derive(make_body(), **observed)
    assert conds(status)[c.SUCCEEDED].status == "True"
    assert status.phase == Phase.RUNNING  # not registered yet
    assert status.metrics == {"train_loss": 1.5, "eval_loss": 1.7}
    assert status.artifact.volume.path == "out/run-1/run-1-uid/model"
    changes = plan(make_body(), parse(make_body()), status, Observed(now=NOW, **observed), SETTINGS)
    model = changes.register
    assert model["metadata"]["name"] == "run-1"
    assert model["spec"]["sourceJob"] == {
        "name": "run-1",
        "namespace": "team-a",
        "uid": "uid-1",
        "generation": 1,
    }
    assert model["spec"]["artifact"]["digest"] == "sha256:abc"
    assert model["spec"]["dataset"]["digest"] == "sha256:data"
    assert model["spec"]["adapter"]["lora"]["rank"] == 4
    assert "--enable-lora" in model["spec"]["serving"]["vllm"]
    assert "ownerReferences" not in model["metadata"]  # outlives the job

    registered = {"metadata": {"name": "run-1"}, "spec": {"sourceJob": {"uid": "uid-1"}}}
    final = derive(make_body(), previous=status, registered_model=registered, **observed)
    assert final.phase == Phase.SUCCEEDED
    assert final.registered_model == "run-1"


def test_registration_refuses_a_name_taken_by_another_job() -> None:
    done = job("run-1-train", conditions=[condition("Complete")])
    other = {"metadata": {"name": "run-1"}, "spec": {"sourceJob": {"uid": "someone-else"}}}
    status = derive(
        make_body(),
        validate_job=validated_job(),
        train_job=done,
        report={"result": RESULT.model_dump_json(by_alias=True)},
        registered_model=other,
    )
    # Taken while the job trained: nothing is lost, the job is not failed, and the
    # fix named is one the API accepts after training (the spec is frozen by then).
    assert status.failure is None and status.phase == Phase.RUNNING
    registered = conds(status)["Registered"]
    assert (registered.status, registered.reason) == ("False", "NameTaken")
    assert "delete it" in registered.message and "out/run-1/run-1-uid/model" in registered.message
    assert (
        plan(
            make_body(),
            parse(make_body()),
            status,
            Observed(now=NOW, train_job=done, registered_model=other),
            SETTINGS,
        ).register
        is None
    )


def test_success_without_result_is_a_failure() -> None:
    done = job("run-1-train", conditions=[condition("Complete")])
    status = derive(make_body(), validate_job=validated_job(), train_job=done)
    assert status.phase == Phase.FAILED
    assert status.failure.reason == "RegistrationFailed"


@pytest.mark.parametrize(
    ("job_reason", "terminated", "reason", "text"),
    [
        (
            "BackoffLimitExceeded",
            {"exitCode": 137, "reason": "OOMKilled"},
            "OOMKilled",
            "batchSize",
        ),
        (
            "PodFailurePolicy",
            {"exitCode": 66, "message": "model not found"},
            "InputNotFound",
            "model not found",
        ),
        (
            "PodFailurePolicy",
            {"exitCode": 64, "message": "bad config"},
            "InvalidSpec",
            "bad config",
        ),
        (
            "BackoffLimitExceeded",
            {"exitCode": 1, "message": "CUDA error"},
            "TrainerError",
            "CUDA error",
        ),
        ("DeadlineExceeded", {"exitCode": 143}, "DeadlineExceeded", "activeDeadlineSeconds"),
    ],
)
def test_failure_classes(job_reason, terminated, reason, text) -> None:
    failed = job(
        "run-1-train", conditions=[condition("Failed", job_reason)], activeDeadlineSeconds=60
    )
    status = derive(
        make_body(),
        validate_job=validated_job(),
        train_job=failed,
        train_pods=[pod("t", "Failed", terminated=terminated)],
    )
    assert status.phase == Phase.FAILED
    assert status.failure.reason == reason
    assert text in status.failure.message


def test_trainer_error_message_comes_from_the_termination_document() -> None:
    error = ErrorReport(reason="TrainerError", message="NaN loss at step 40: lower learningRate")
    failed = job("run-1-train", conditions=[condition("Failed", "BackoffLimitExceeded")])
    pods = [
        pod(
            f"t{i}",
            "Failed",
            created=f"2026-11-25T11:0{i}:00Z",
            terminated={"exitCode": 1, "message": termination(error=error)},
        )
        for i in range(2)
    ]
    status = derive(make_body(), validate_job=validated_job(), train_job=failed, train_pods=pods)
    assert (
        status.failure.message
        == "failed 2 time(s), last error: NaN loss at step 40: lower learningRate"
    )
    assert status.failure.exit_code == 1
    assert status.retries == 2


def test_image_pull_backoff_fails_after_the_timeout() -> None:
    waiting = {"reason": "ImagePullBackOff", "message": "not found"}
    observed = dict(
        validate_job=validated_job(),
        train_job=job("run-1-train"),
        train_pods=[pod("t", "Pending", waiting=waiting, created="2026-11-25T11:59:30Z")],
    )
    early = derive(make_body(), **observed)
    assert early.phase != Phase.FAILED
    assert conds(early)[c.RUNNING].reason == c.IMAGE_PULL_BACKOFF
    late = derive(make_body(), now=NOW + timedelta(seconds=120), **observed)
    assert late.failure.reason == "ImagePullFailed"
    assert "trainer:1" in late.failure.message
    # A failed job's still-running Job is stopped.
    changes = plan(make_body(), parse(make_body()), late, Observed(now=NOW, **observed), SETTINGS)
    assert changes.delete_train_job


def test_preemption_is_counted_not_failed() -> None:
    disrupted = pod(
        "t1",
        "Failed",
        terminated={"exitCode": 143},
        conditions=[
            {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
        ],
    )
    status = derive(
        make_body(),
        validate_job=validated_job(),
        train_job=job("run-1-train", start=True),
        train_pods=[disrupted, pod("t2", "Running", created="2026-11-25T11:05:00Z")],
    )
    assert status.phase == Phase.RUNNING
    assert status.preemptions == 1
    assert status.retries == 0


def test_preemptions_are_a_running_total_not_the_pods_disrupted_at_once() -> None:
    def disrupted(name: str, uid: str) -> dict:
        found = pod(
            name,
            "Failed",
            terminated={"exitCode": 143},
            conditions=[
                {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
            ],
        )
        found["metadata"]["uid"] = uid
        return found

    body, train = make_body(), job("run-1-train", start=True)

    def look(previous, *pods):
        return derive(
            body, previous, validate_job=validated_job(), train_job=train, train_pods=list(pods)
        )

    first = look(None, disrupted("a", "u-a"))
    assert first.preemptions == 1
    # Seen again: not counted twice.
    again = look(first, disrupted("a", "u-a"))
    assert again.preemptions == 1
    # The first pod is gone (preempted pods are deleted) and its replacement is preempted too.
    second = look(again, disrupted("b", "u-b"))
    assert second.preemptions == 2
    assert second.counted_disruptions == ["u-b"]  # only what is still in view


def test_unschedulable_pod_is_queued_with_the_scheduler_message() -> None:
    pending = pod("t", "Pending")
    pending["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "Insufficient nvidia.com/gpu",
        }
    ]
    status = derive(
        make_body(),
        validate_job=validated_job(),
        train_job=job("run-1-train"),
        train_pods=[pending],
    )
    assert status.phase == Phase.QUEUED
    assert conds(status)[c.RUNNING].message == "Insufficient nvidia.com/gpu"


def test_suspend_and_queue() -> None:
    body = make_body(dict(SPEC, suspend=True))
    status = derive(body, validate_job=validated_job(), train_job=job("run-1-train", suspend=True))
    assert status.phase == Phase.SUSPENDED
    queued = derive(
        make_body(labels={naming.KUEUE_QUEUE_LABEL: "q"}),
        validate_job=validated_job(),
        train_job=job("run-1-train", suspend=True),
    )
    assert queued.phase == Phase.QUEUED
    assert conds(queued)[c.SUSPENDED].reason == c.WAITING_FOR_QUEUE


def test_plan_suspends_and_resumes_but_leaves_admission_to_the_queue() -> None:
    body = make_body(dict(SPEC, suspend=True))
    running = job("run-1-train", start=True, spec_hash=builders.spec_hash(parse(body)))
    status = derive(body, validate_job=validated_job(), train_job=running)
    assert (
        plan(
            body,
            parse(body),
            status,
            Observed(now=NOW, validate_job=validated_job(), train_job=running),
            SETTINGS,
        ).set_train_suspend
        is True
    )
    body = make_body()
    held = job("run-1-train", suspend=True, spec_hash=builders.spec_hash(parse(body)))
    status = derive(body, validate_job=validated_job(), train_job=held)
    observed = Observed(now=NOW, validate_job=validated_job(), train_job=held)
    assert plan(body, parse(body), status, observed, SETTINGS).set_train_suspend is False
    queued = make_body(labels={naming.KUEUE_QUEUE_LABEL: "q"})
    assert plan(queued, parse(queued), status, observed, SETTINGS).set_train_suspend is None


def test_plan_creates_children_then_validation_then_training() -> None:
    body = make_body()
    status = derive(body)
    first = plan(body, parse(body), status, Observed(now=NOW), SETTINGS)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in first.create]
    # Nothing but the Jobs: no ConfigMaps, ServiceAccounts or RBAC per job.
    assert kinds == [("Job", "run-1-validate")]
    observed = Observed(
        now=NOW,
        validate_job=validated_job(),
    )
    status = derive(body, **{k: getattr(observed, k) for k in ("now", "validate_job")})
    second = plan(body, parse(body), status, observed, SETTINGS)
    assert [o["metadata"]["name"] for o in second.create] == ["run-1-train"]
    assert second.create[0]["spec"]["suspend"] is False


def test_plan_is_idempotent_once_everything_exists() -> None:
    body = make_body()
    train = builders.desired_job(body, parse(body), SETTINGS, TrainerMode.TRAIN, suspend=False)
    observed = Observed(
        now=NOW,
        validate_job=validated_job(),
        train_job=train,
    )
    status = derive(body, validate_job=validated_job(), train_job=train)
    assert plan(body, parse(body), status, observed, SETTINGS).empty()
    # And deriving twice from the same world gives the same status.
    assert (
        derive(body, previous=status, validate_job=validated_job(), train_job=train).to_api()
        == status.to_api()
    )


def test_cancel_stops_the_job_and_keeps_the_record() -> None:
    body = make_body(dict(SPEC, cancel=True))
    running = job("run-1-train", start=True)
    status = derive(
        body, validate_job=validated_job(), train_job=running, train_pods=[pod("t", "Running")]
    )
    assert status.phase == Phase.CANCELLED
    assert plan(
        body, parse(body), status, Observed(now=NOW, train_job=running), SETTINGS
    ).delete_train_job


def test_terminal_status_sticks_after_children_are_gone() -> None:
    done = job("run-1-train", conditions=[condition("Complete")])
    observed = dict(
        validate_job=validated_job(),
        train_job=done,
        report={"result": RESULT.model_dump_json(by_alias=True)},
        registered_model={"metadata": {"name": "run-1"}, "spec": {"sourceJob": {"uid": "uid-1"}}},
    )
    succeeded = derive(make_body(), **observed)
    assert succeeded.phase == Phase.SUCCEEDED
    later = derive(
        make_body(),
        previous=succeeded,
        registered_model={"metadata": {"name": "run-1"}, "spec": {"sourceJob": {"uid": "uid-1"}}},
    )
    assert later.to_api() == succeeded.to_api()
    assert plan(make_body(), parse(make_body()), later, Observed(now=NOW), SETTINGS).empty()


def test_condition_transition_time_moves_only_on_change() -> None:
    first = derive(make_body())
    again = derive(make_body(), previous=first, now=NOW + timedelta(minutes=5))
    assert (
        conds(again)[c.DATASET_VALIDATED].last_transition_time
        == conds(first)[c.DATASET_VALIDATED].last_transition_time
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59, "59s"), (95, "1m35s"), (3725, "1h2m")]
)
def test_format_duration(seconds, text) -> None:
    assert format_duration(seconds) == text


def test_status_round_trips_through_json() -> None:
    status = derive(make_body())
    assert (
        FineTuningJobStatus.model_validate(json.loads(status.model_dump_json(by_alias=True)))
        == status
    )
