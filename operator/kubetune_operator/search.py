"""A FineTuningSweep's search, as a pure function of the sweep and its trials.

Nothing of the search lives in the operator's memory: the values of each
trial are recorded on the trial (an annotation of its FineTuningJob), and
every look rebuilds an Optuna study from the trials that exist, finished ones
with their objective. The suggestion for trial number N comes from a sampler
seeded by (sweep seed, N), so asking twice, late, or after a restart gives the
same values for the same history, and a retried handler never creates a
different trial under the same name.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState, create_trial

from kubetune.api.finetuningjob import FineTuningJobSpec
from kubetune.api.sweep import Algorithm, Direction, FineTuningSweepSpec, ParameterType

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Trials TPE draws at random before it models the good ones.
BAYESIAN_STARTUP_TRIALS = 4


@dataclass(frozen=True)
class Trial:
    """A trial as observed: its number, the values it tried, how it ended."""

    number: int
    parameters: dict[str, Any]
    phase: str = ""  # the FineTuningJob's phase; "" before it has one
    objective: float | None = None
    stopped: bool = False  # by the median rule: neither a failure nor a result
    history: tuple[tuple[int, float], ...] = ()  # (step, validation loss) seen while it ran

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed", "Cancelled")

    @property
    def failed(self) -> bool:
        if self.stopped:
            return False
        return self.phase in ("Failed", "Cancelled") or (
            self.phase == "Succeeded" and self.objective is None
        )


def distributions(spec: FineTuningSweepSpec) -> dict[str, BaseDistribution]:
    result: dict[str, BaseDistribution] = {}
    for p in spec.parameters:
        if p.type == ParameterType.CATEGORICAL:
            result[p.path] = CategoricalDistribution(list(p.values or []))
        elif p.type == ParameterType.INT:
            low, high, step = int(p.min or 0), int(p.max or 0), p.step or 1
            result[p.path] = IntDistribution(low, low + (high - low) // step * step, step=step)
        else:
            result[p.path] = FloatDistribution(
                float(p.min or 0), float(p.max or 0), log=p.type == ParameterType.LOG_UNIFORM
            )
    return result


def grid(spec: FineTuningSweepSpec) -> list[dict[str, Any]]:
    """Every combination, in a fixed order. Optuna's GridSampler keeps what it visited in
    its own trial attributes, which trials rebuilt from the cluster do not carry; walking
    the product in order is the same search, deterministic by construction."""
    axes = []
    for p in spec.parameters:
        if p.type == ParameterType.CATEGORICAL:
            axes.append([(p.path, v) for v in p.values or []])
        else:
            axes.append([(p.path, v) for v in range(int(p.min), int(p.max) + 1, p.step or 1)])
    return [dict(combination) for combination in itertools.product(*axes)]


def total_trials(spec: FineTuningSweepSpec) -> int:
    """maxTrials, or fewer when a grid has fewer points."""
    if spec.algorithm == Algorithm.GRID:
        return min(spec.max_trials, len(grid(spec)))
    return spec.max_trials


def _sampler(spec: FineTuningSweepSpec, number: int) -> optuna.samplers.BaseSampler:
    seed = (spec.seed * 1_000_003 + number) % 2**32
    if spec.algorithm == Algorithm.RANDOM:
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=BAYESIAN_STARTUP_TRIALS)


def suggest(spec: FineTuningSweepSpec, trials: Sequence[Trial], number: int) -> dict[str, Any]:
    """The values of trial `number`, given the trials before it."""
    if spec.algorithm == Algorithm.GRID:
        return grid(spec)[number]
    space = distributions(spec)
    direction = "minimize" if spec.objective.direction == Direction.MINIMIZE else "maximize"
    study = optuna.create_study(direction=direction, sampler=_sampler(spec, number))
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.number >= number:
            continue
        params = {k: v for k, v in trial.parameters.items() if k in space}
        if set(params) != set(space):
            continue  # tried before the search space changed: not comparable
        state, value = TrialState.RUNNING, None
        if trial.stopped:
            state = TrialState.PRUNED
        elif trial.finished:
            state = TrialState.FAIL if trial.failed else TrialState.COMPLETE
            value = trial.objective if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(params=params, distributions=space, state=state, value=value))
    return dict(study.ask(space).params)


def should_stop(spec: FineTuningSweepSpec, trial: Trial, trials: Sequence[Trial]) -> bool:
    """The median stopping rule: stop a running trial whose best validation loss so far is
    worse than the median of the other trials' best by the same step, among those that
    reached it. Optuna's MedianPruner compares values at exactly the same step; the
    operator sees each trial's progress when its status changes (paced), so the steps of
    two trials rarely coincide: here another trial's value by a step is its best at or
    before it, which is what a validation loss evaluated every few steps means."""
    rule = spec.early_stopping
    if rule is None or trial.finished or trial.stopped or not trial.history:
        return False
    step = max(s for s, _ in trial.history)
    if step < max(1, rule.min_steps):
        return False
    mine = min(v for _, v in trial.history)
    peers = []
    for other in trials:
        if other.number == trial.number or other.stopped or not other.history:
            continue
        if max(s for s, _ in other.history) < step:
            continue  # has not got this far
        by_then = [v for s, v in other.history if s <= step]
        if by_then:
            peers.append(min(by_then))
    if len(peers) < rule.min_trials:
        return False
    return mine > statistics.median(peers)


def parameters_annotation(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)


def parse_parameters(text: str | None) -> dict[str, Any]:
    try:
        values = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return values if isinstance(values, dict) else {}


def trial_spec(template: FineTuningJobSpec, values: dict[str, Any]) -> FineTuningJobSpec:
    """The template with each `section.field` set; values are read as the field's type."""
    document = template.model_dump(mode="json", by_alias=True, exclude_none=True)
    for path, value in values.items():
        section, _, name = path.partition(".")
        if not name:
            document[section] = value
        else:
            document.setdefault(section, {})[name] = value
    return FineTuningJobSpec.model_validate(document)


def better(direction: Direction, a: float, b: float) -> bool:
    return a < b if direction == Direction.MINIMIZE else a > b


def best_trial(spec: FineTuningSweepSpec, trials: Sequence[Trial]) -> Trial | None:
    """The succeeded trial with the best objective (the earliest on a tie)."""
    best = None
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.phase != "Succeeded" or trial.objective is None or math.isnan(trial.objective):
            continue
        if best is None or better(spec.objective.direction, trial.objective, best.objective):
            best = trial
    return best


@dataclass(frozen=True)
class SearchPlan:
    create: list[tuple[int, dict[str, Any]]]  # (number, values) of trials to create now
    done: bool  # every trial ended: nothing more will be created
    failed: bool  # the failure budget is spent
    best: Trial | None


def plan_search(spec: FineTuningSweepSpec, trials: Sequence[Trial]) -> SearchPlan:
    """What to create next: never more than `parallelism` running nor `total_trials` in all.
    Trial numbers are 0, 1, 2, ...: a missing number is created before any later one, so
    the name of trial N always means the same values."""
    total = total_trials(spec)
    failures = sum(1 for t in trials if t.finished and t.failed)
    budget_spent = failures > spec.max_failed_trials
    running = sum(1 for t in trials if not t.finished)
    existing = {t.number for t in trials}
    create: list[tuple[int, dict[str, Any]]] = []
    if not budget_spent:
        known = list(trials)
        for number in range(total):
            if running + len(create) >= spec.parallelism:
                break
            if number in existing:
                continue
            values = suggest(spec, known, number)
            create.append((number, values))
            known.append(Trial(number, values))
    ended = sum(1 for t in trials if t.finished)
    done = not create and running == 0 and (ended >= total or budget_spent)
    return SearchPlan(create=create, done=done, failed=budget_spent, best=best_trial(spec, trials))
