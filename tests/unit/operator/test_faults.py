"""The operator's rules for ordinary faults: a taken name, an edit while pods are Pending,
suspend toggles, cancel during validation, fast jobs, lineage written once, and a status
written by another operator version."""

from __future__ import annotations

import copy

from kubetune_operator import builders
from kubetune_operator import conditions as c
from kubetune_operator.observed import Observed
from kubetune_operator.plan import plan
from kubetune_operator.reconcile import parse_status
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.status import derive_status

from kubetune.api.finetuningjob import FineTuningJobStatus, Phase
from tests.unit.operator.conftest import NOW, SPEC, condition, job, make_body, parse, pod

SETTINGS = OperatorSettings(trainer_image="trainer:2")


def step(body, previous=None, **seen):
    """One reconcile's pure part: the status, then the plan."""
    observed = Observed(now=NOW, **seen)
    status = derive_status(body, parse(body), previous or FineTuningJobStatus(), observed, SETTINGS)
    return status, plan(body, parse(body), status, observed, SETTINGS)


def validated():
    return job("run-1-validate", conditions=[condition("Complete")])


def current_hash(body=None):
    return builders.spec_hash(parse(body or make_body()))


def test_a_taken_registration_name_is_reported_before_any_gpu_is_requested() -> None:
    other = {"metadata": {"name": "run-1"}, "spec": {"sourceJob": {"name": "old", "uid": "u0"}}}
    status, changes = step(make_body(), validate_job=validated(), registered_model=other)
    registered = {x.type: x for x in status.conditions}["Registered"]
    assert (registered.status, registered.reason) == ("False", c.NAME_TAKEN)
    assert "spec.registration.modelName" in registered.message
    assert not any(o["kind"] == "Job" for o in changes.create)  # no training Job
    assert "registration name is taken" in {x.type: x for x in status.conditions}["Running"].message
    # Renamed: the name is free, training starts.
    renamed = make_body({**SPEC, "registration": {"modelName": "run-1-v2"}}, generation=2)
    status, changes = step(renamed, status, validate_job=validated())
    assert {x.type: x.reason for x in status.conditions}["Registered"] == c.NAME_FREE
    assert [o["metadata"]["name"] for o in changes.create if o["kind"] == "Job"] == ["run-1-train"]


def test_an_edit_while_the_pod_is_pending_replaces_the_job() -> None:
    old = job("run-1-train", start=True, spec_hash="an-older-spec")
    pending = pod("run-1-train-abc", "Pending")
    status, changes = step(
        make_body(generation=2), validate_job=validated(), train_job=old, train_pods=[pending]
    )
    assert changes.delete_train_job
    assert status.start_time is None  # the API keeps accepting edits
    running = pod("run-1-train-abc", "Running")
    status, changes = step(
        make_body(generation=2),
        FineTuningJobStatus(observed_generation=1),
        validate_job=validated(),
        train_job=old,
        train_pods=[running],
    )
    assert not changes.delete_train_job  # too late: the trainer runs generation 1
    assert status.observed_generation == 1 and status.start_time is not None


def test_suspend_and_cancel_do_not_change_the_pods_spec() -> None:
    suspended = make_body({**SPEC, "suspend": True})
    assert current_hash(suspended) == current_hash()
    train = job("run-1-train", spec_hash=current_hash())
    _, changes = step(suspended, validate_job=validated(), train_job=train)
    assert not changes.delete_train_job and changes.set_train_suspend is True


def test_cancel_stops_a_running_validation() -> None:
    cancelled = make_body({**SPEC, "cancel": True})
    running = job("run-1-validate")
    status, changes = step(cancelled, validate_job=running)
    assert status.phase == Phase.CANCELLED
    status, changes = step(cancelled, status, validate_job=running)
    assert changes.delete_validate_job


def test_a_job_that_finished_between_two_looks_gets_its_start_time() -> None:
    done = job("run-1-train", start=True, conditions=[condition("Complete")])
    status, _ = step(make_body(), validate_job=validated(), train_job=done)
    assert status.start_time is not None and status.start_time.hour == 11


def test_the_image_and_hyperparameters_come_from_the_job_that_exists() -> None:
    train = job("run-1-train", spec_hash=current_hash())
    train["spec"]["template"] = {"spec": {"containers": [{"name": "t", "image": "trainer:1"}]}}
    recorded = FineTuningJobStatus.model_validate(
        {
            "hyperparameters": derive_status(
                make_body(), parse(make_body()), FineTuningJobStatus(), Observed(now=NOW), SETTINGS
            ).hyperparameters.model_dump(mode="json", by_alias=True)
        }
    )
    recorded.hyperparameters.learning_rate = 0.123  # as resolved by an earlier version
    status, _ = step(make_body(), recorded, validate_job=validated(), train_job=train)
    assert status.trainer_image == "trainer:1"  # not the operator's new default, trainer:2
    assert status.hyperparameters.learning_rate == 0.123
    # Before any Job exists: what would be created now.
    status, _ = step(make_body(), recorded, validate_job=validated())
    assert status.trainer_image == "trainer:2" and status.hyperparameters.learning_rate != 0.123


def test_a_status_from_a_newer_operator_is_read_not_reset() -> None:
    written = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "futureField": {"x": 1},
        "progress": {"step": 3, "totalSteps": 3, "newerCounter": 7},
    }
    status = parse_status(copy.deepcopy(written))
    assert status is not None and status.phase == Phase.SUCCEEDED
    assert status.progress.step == 3
    assert parse_status({"phase": "NoSuchPhase"}) is None  # unreadable: left alone
