"""A sweep's search as a pure function of the sweep and its trials: deterministic,
bounded by parallelism and maxTrials, rebuilt from the trials after a restart."""

from __future__ import annotations

import math

import pytest
from kubetune_operator.search import (
    Trial,
    best_trial,
    grid,
    parameters_annotation,
    parse_parameters,
    plan_search,
    should_stop,
    suggest,
    total_trials,
    trial_spec,
)

from kubetune.api.sweep import FineTuningSweepSpec
from tests.unit.operator.conftest import SPEC


def sweep(**changes) -> FineTuningSweepSpec:
    document = {
        "template": SPEC,
        "parameters": [
            {
                "path": "hyperparameters.learningRate",
                "type": "logUniform",
                "min": 1e-5,
                "max": 1e-2,
            },
            {"path": "lora.rank", "type": "int", "min": 4, "max": 32, "step": 4},
            {
                "path": "hyperparameters.lrScheduler",
                "type": "categorical",
                "values": ["linear", "cosine"],
            },
        ],
        "objective": {"metric": "eval_loss", "direction": "minimize"},
        "maxTrials": 6,
        "parallelism": 2,
        "algorithm": "random",
        "seed": 11,
    }
    document.update(changes)
    return FineTuningSweepSpec.model_validate(document)


def test_values_lie_in_their_ranges_and_repeat_for_the_same_history() -> None:
    spec = sweep()
    first = suggest(spec, [], 0)
    assert first == suggest(spec, [], 0)  # asked again, late, or after a restart
    for number in range(20):
        values = suggest(spec, [], number)
        assert 1e-5 <= values["hyperparameters.learningRate"] <= 1e-2
        assert values["lora.rank"] in range(4, 33, 4)
        assert values["hyperparameters.lrScheduler"] in ("linear", "cosine")
    assert len({suggest(spec, [], n)["hyperparameters.learningRate"] for n in range(5)}) == 5


def test_never_more_than_parallelism_nor_max_trials() -> None:
    spec = sweep()
    plan = plan_search(spec, [])
    assert [number for number, _ in plan.create] == [0, 1]
    trials = [Trial(n, values) for n, values in plan.create]
    assert plan_search(spec, trials).create == []  # both still running
    trials[0] = Trial(0, trials[0].parameters, "Succeeded", 1.2)
    again = plan_search(spec, trials)
    assert [number for number, _ in again.create] == [2]
    finished = [Trial(n, suggest(spec, [], n), "Succeeded", float(n)) for n in range(6)]
    final = plan_search(spec, finished)
    assert final.create == [] and final.done
    assert final.best.number == 0


def test_a_missing_trial_number_is_created_first_with_the_same_values() -> None:
    """After a crash between creating trial 1 and trial 2, or a deleted trial: the next
    look fills the gap, and the values for a number do not depend on who asks."""
    spec = sweep(parallelism=3)
    planned = plan_search(spec, []).create
    observed = [Trial(0, planned[0][1]), Trial(2, planned[2][1])]
    assert plan_search(spec, observed).create == [(1, planned[1][1])]


def test_grid_walks_every_combination_once() -> None:
    spec = sweep(
        algorithm="grid",
        parameters=[
            {"path": "lora.rank", "type": "int", "min": 8, "max": 16, "step": 8},
            {
                "path": "hyperparameters.lrScheduler",
                "type": "categorical",
                "values": ["linear", "cosine"],
            },
        ],
        maxTrials=10,
        parallelism=10,
    )
    assert total_trials(spec) == 4
    points = [values for _, values in plan_search(spec, []).create]
    assert points == grid(spec)
    assert {(p["lora.rank"], p["hyperparameters.lrScheduler"]) for p in points} == {
        (8, "linear"),
        (8, "cosine"),
        (16, "linear"),
        (16, "cosine"),
    }


def test_the_failure_budget_stops_the_sweep() -> None:
    spec = sweep(maxFailedTrials=1, parallelism=3)
    trials = [Trial(0, {}, "Failed"), Trial(1, {}, "Failed"), Trial(2, {}, "Succeeded", 0.5)]
    plan = plan_search(spec, trials)
    assert plan.failed and plan.done and plan.create == []
    assert plan.best.number == 2
    # Within the budget, a failed trial is recorded and the search goes on.
    assert plan_search(sweep(maxFailedTrials=2, parallelism=3), trials).create


@pytest.mark.parametrize(("direction", "best"), [("minimize", 1), ("maximize", 2)])
def test_best_trial_follows_the_direction(direction, best) -> None:
    spec = sweep(objective={"metric": "eval_contains", "direction": direction})
    trials = [
        Trial(0, {}, "Succeeded", 0.5),
        Trial(1, {}, "Succeeded", 0.2),
        Trial(2, {}, "Succeeded", 0.9),
        Trial(3, {}, "Failed"),
        Trial(4, {}, "Succeeded", math.nan),
        Trial(5, {}, "Running", 0.0),
    ]
    assert best_trial(spec, trials).number == best


def test_bayesian_search_finds_the_good_region() -> None:
    """TPE on a 1-D bowl over log10(learning rate) with its minimum at 1e-3: after the
    random start-up trials it draws near the minimum more often than random search does
    with the same budget and seed."""
    parameters = [
        {"path": "hyperparameters.learningRate", "type": "logUniform", "min": 1e-6, "max": 1e-1}
    ]

    def loss(values) -> float:
        return (math.log10(values["hyperparameters.learningRate"]) + 3) ** 2

    def run(algorithm: str) -> list[Trial]:
        spec = sweep(algorithm=algorithm, parameters=parameters, maxTrials=30, parallelism=1)
        trials: list[Trial] = []
        for number in range(30):
            values = suggest(spec, trials, number)
            trials.append(Trial(number, values, "Succeeded", loss(values)))
        return trials

    def near(trials: list[Trial]) -> int:  # within half a decade of the minimum
        return sum(t.objective < 0.25 for t in trials[10:])

    bayesian, random = run("bayesian"), run("random")
    assert near(bayesian) >= 2 * max(1, near(random))

    def late_mean(trials: list[Trial]) -> float:
        return sum(t.objective for t in trials[10:]) / 20

    assert late_mean(bayesian) < late_mean(random) / 2


def test_trial_spec_reads_values_as_the_field_types() -> None:
    spec = trial_spec(
        sweep().template,
        {
            "lora.rank": "16",
            "hyperparameters.lrScheduler": "cosine",
            "seed": 3,
            "hyperparameters.learningRate": 3e-4,
        },
    )
    assert spec.lora.rank == 16
    assert spec.hyperparameters.lr_scheduler.value == "cosine"
    assert spec.hyperparameters.learning_rate == 3e-4
    assert spec.seed == 3


def test_recorded_parameters_round_trip_and_garbage_reads_as_none() -> None:
    values = {"lora.rank": 8, "hyperparameters.learningRate": 1e-4}
    assert parse_parameters(parameters_annotation(values)) == values
    assert parse_parameters("not json") == {} and parse_parameters('"x"') == {}


def stopping(**rule) -> FineTuningSweepSpec:
    return sweep(earlyStopping={"minTrials": 2, "minSteps": 4, **rule}, maxTrials=6)


def test_the_median_rule_stops_a_trial_worse_than_the_others_by_the_same_step() -> None:
    spec = stopping()
    good = Trial(0, {}, "Succeeded", 1.0, history=((2, 2.0), (4, 1.5), (8, 1.0)))
    fair = Trial(1, {}, "Running", history=((3, 2.2), (6, 1.8)))
    bad = Trial(2, {}, "Running", history=((2, 3.0), (5, 2.9)))
    trials = [good, fair, bad]
    # By step 5: good's best is 1.5 (step 4), fair's 2.2 (step 3); median 1.85 < 2.9.
    assert should_stop(spec, bad, trials)
    assert not should_stop(spec, fair, trials)  # only one other trial got to step 6
    # Too early (minSteps), too few peers, rule off, or already ended: never.
    early = Trial(2, {}, "Running", history=((3, 9.0),))
    assert not should_stop(spec, early, trials)
    assert not should_stop(stopping(minTrials=3), bad, trials)
    assert not should_stop(sweep(), bad, trials)
    assert not should_stop(spec, Trial(2, {}, "Succeeded", 2.9, history=bad.history), trials)


def test_peers_that_have_not_reached_the_step_do_not_count() -> None:
    spec = stopping()
    slow = Trial(0, {}, "Running", history=((2, 1.0),))
    other = Trial(1, {}, "Running", history=((2, 1.1), (10, 0.9)))
    bad = Trial(2, {}, "Running", history=((6, 5.0),))
    assert not should_stop(spec, bad, [slow, other, bad])  # only one peer got to step 6


def test_a_stopped_trial_is_neither_a_failure_nor_a_result() -> None:
    spec = sweep(maxFailedTrials=0, parallelism=3)
    trials = [
        Trial(0, {}, "Succeeded", 1.0),
        Trial(1, {}, "Cancelled", None, stopped=True),
        Trial(2, {}, "Cancelled", None),  # cancelled by a person: a failure
    ]
    assert not trials[1].failed and trials[2].failed
    plan = plan_search(spec, trials)
    assert plan.failed  # the one real failure spends a budget of 0
    assert plan_search(sweep(maxFailedTrials=1, parallelism=3), trials).create  # goes on
    # The rebuilt study sees it as pruned (values still suggested for the next number).
    values = suggest(
        sweep(algorithm="bayesian"),
        [
            Trial(
                0,
                {
                    "hyperparameters.learningRate": 1e-3,
                    "lora.rank": 8,
                    "hyperparameters.lrScheduler": "linear",
                },
                "Cancelled",
                stopped=True,
            )
        ],
        1,
    )
    assert set(values) == {
        "hyperparameters.learningRate",
        "lora.rank",
        "hyperparameters.lrScheduler",
    }
