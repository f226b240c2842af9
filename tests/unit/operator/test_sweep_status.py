"""A sweep's trials, status and kept models from observed objects (pure)."""

from __future__ import annotations

import json

from kubetune_operator import naming
from kubetune_operator.search import Trial, plan_search
from kubetune_operator.sweep_status import (
    COMPLETE,
    FAILED,
    derive_sweep_status,
    desired_trial,
    models_to_keep,
    observed_trials,
    trial_model,
)

from kubetune.api.sweep import FineTuningSweepSpec, FineTuningSweepStatus
from tests.unit.operator.conftest import NOW, SPEC
from tests.unit.trainer.helpers import DEFAULT_HYPERPARAMETERS

SWEEP = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuningSweep",
    "metadata": {"name": "lr", "namespace": "team-a", "uid": "sweep-uid", "generation": 1},
}


def spec(**changes) -> FineTuningSweepSpec:
    document = {
        "template": SPEC,
        "parameters": [
            {"path": "hyperparameters.learningRate", "type": "logUniform", "min": 1e-4, "max": 1e-2}
        ],
        "objective": {"metric": "eval_loss", "direction": "minimize"},
        "maxTrials": 3,
        "parallelism": 2,
        "algorithm": "random",
    }
    return FineTuningSweepSpec.model_validate(document | changes)


def as_observed(
    trial: dict, phase: str, loss: float | None = None, owner: str = "sweep-uid"
) -> dict:
    trial = json.loads(json.dumps(trial))
    trial["metadata"]["uid"] = f"uid-{trial['metadata']['name']}"
    trial["metadata"]["ownerReferences"][0]["uid"] = owner
    trial["status"] = {"phase": phase, "metrics": {} if loss is None else {"eval_loss": loss}}
    return trial


def test_a_trial_is_the_template_with_its_values_owned_and_labelled() -> None:
    trial = desired_trial(SWEEP, spec(), 1, {"hyperparameters.learningRate": 3e-3})
    meta = trial["metadata"]
    assert meta["name"] == "lr-t1"
    assert meta["labels"][naming.LABEL_SWEEP_UID] == "sweep-uid"
    assert meta["ownerReferences"][0]["kind"] == "FineTuningSweep"
    assert meta["ownerReferences"][0]["controller"] is True
    assert json.loads(meta["annotations"][naming.ANNOTATION_TRIAL_PARAMETERS]) == {
        "hyperparameters.learningRate": 3e-3
    }
    assert trial["spec"]["hyperparameters"]["learningRate"] == 3e-3
    assert trial["spec"]["registration"]["enabled"] is False  # the sweep registers
    assert trial["spec"]["baseModel"]["name"] == SPEC["baseModel"]["name"]


def test_only_the_sweeps_own_trials_count() -> None:
    lr = "hyperparameters.learningRate"
    mine = as_observed(desired_trial(SWEEP, spec(), 0, {lr: 1e-3}), "Succeeded", 1.5)
    stranger = as_observed(desired_trial(SWEEP, spec(), 1, {lr: 2e-3}), "Running", owner="other")
    trials = observed_trials(SWEEP, spec(), [mine, stranger])
    assert trials == [Trial(0, {lr: 1e-3}, "Succeeded", 1.5)]


def test_status_lists_trials_and_the_best_and_ends_when_all_ended() -> None:
    s = spec()
    trials = [Trial(0, {"a": 1}, "Succeeded", 1.5), Trial(1, {"a": 2}, "Running")]
    status = derive_sweep_status(
        SWEEP, s, FineTuningSweepStatus(), trials, plan_search(s, trials), None, NOW
    )
    assert status.phase == "Running" and status.trials_done == "1/3"
    assert (status.best_trial, status.best_objective_shown) == ("lr-t0", "1.5")
    assert [t.name for t in status.trials] == ["lr-t0", "lr-t1"]
    conditions = {cond.type: cond for cond in status.conditions}
    assert conditions[COMPLETE].status == "False"
    finished = [*trials[:1], Trial(1, {"a": 2}, "Succeeded", 0.75), Trial(2, {"a": 3}, "Failed")]
    plan = plan_search(s, finished)
    final = derive_sweep_status(SWEEP, s, status, finished, plan, "lr-t1", NOW)
    assert final.phase == "Succeeded" and final.trials_done == "3/3"
    assert (final.best_trial, final.best_model) == ("lr-t1", "lr-t1")
    assert {c.type: c.status for c in final.conditions} == {COMPLETE: "True", FAILED: "False"}
    assert models_to_keep(s, plan, finished) == [1]
    assert models_to_keep(spec(modelPolicy="keepAll"), plan, finished) == [0, 1]


def test_no_trial_succeeding_fails_the_sweep() -> None:
    s = spec(maxFailedTrials=5)
    trials = [Trial(n, {}, "Failed") for n in range(3)]
    status = derive_sweep_status(
        SWEEP, s, FineTuningSweepStatus(), trials, plan_search(s, trials), None, NOW
    )
    assert status.phase == "Failed"
    assert {c.type: c.reason for c in status.conditions}[FAILED] == "NoTrialSucceeded"


def test_a_trials_model_comes_from_its_status() -> None:
    trial = as_observed(desired_trial(SWEEP, spec(), 0, {}), "Succeeded", 0.9)
    folder = "out/run-1/lr-t0-uid"
    trial["status"].update(
        {
            "artifact": {
                "volume": {"claimName": "models", "path": f"{folder}/model"},
                "kind": "adapter",
                "digest": "sha256:abc",
            },
            "hyperparameters": DEFAULT_HYPERPARAMETERS,
            "completionTime": "2026-01-01T00:00:00Z",
            "datasetDigest": "sha256:data",
        }
    )
    model = trial_model(trial, True, "lr", NOW)
    assert model["metadata"]["name"] == "lr-t0"
    assert model["metadata"]["labels"][naming.LABEL_SWEEP_BEST] == "true"
    assert model["spec"]["artifact"]["volume"] == {"claimName": "models", "path": f"{folder}/model"}
    assert model["spec"]["sourceJob"]["uid"] == "uid-lr-t0"
    assert model["spec"]["metrics"] == {"eval_loss": 0.9}
    assert trial_model({**trial, "status": {"phase": "Succeeded"}}, True, "lr", NOW) is None


def test_validation_losses_seen_accumulate_in_the_status() -> None:
    s = spec(earlyStopping={"minTrials": 1})
    trial = as_observed(
        desired_trial(SWEEP, s, 0, {"hyperparameters.learningRate": 1e-3}), "Running"
    )
    trial["status"]["progress"] = {"step": 4, "evalLoss": 2.5}
    first = observed_trials(SWEEP, s, [trial])
    status = derive_sweep_status(
        SWEEP, s, FineTuningSweepStatus(), first, plan_search(s, first), None, NOW
    )
    assert status.trials[0].history == [[4, 2.5]]
    trial["status"]["progress"] = {"step": 8, "evalLoss": 2.0}
    second = observed_trials(SWEEP, s, [trial], status)
    assert second[0].history == ((4, 2.5), (8, 2.0))
    trial["metadata"]["annotations"][naming.ANNOTATION_STOPPED_EARLY] = "true"
    assert observed_trials(SWEEP, s, [trial], status)[0].stopped
