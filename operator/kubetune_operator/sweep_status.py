"""A FineTuningSweep's desired trials, status and kept models, from what exists. Pure.

Trials are FineTuningJobs the sweep controls, named `<sweep>-t<N>`, labelled
with the sweep, and annotated with their number and values. They register no
model themselves: when the sweep ends it registers the best trial's model
(labelled as the best), and with modelPolicy keepAll the others' too, from
each trial's status, which records everything a RegisteredModel needs.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import ValidationError

from kubetune.api import finetuningjob as ftj
from kubetune.api.finetuningjob import FineTuningJobSpec, FineTuningJobStatus
from kubetune.api.sweep import (
    FineTuningSweepSpec,
    FineTuningSweepStatus,
    ModelPolicy,
    SweepPhase,
    TrialRecord,
)
from kubetune.api.trainer import ResultArtifact, ResultReport
from kubetune_operator import conditions as c
from kubetune_operator import naming
from kubetune_operator import observed as obs
from kubetune_operator.observed import Obj
from kubetune_operator.registration import desired_registered_model
from kubetune_operator.search import (
    SearchPlan,
    Trial,
    parameters_annotation,
    parse_parameters,
    trial_spec,
)
from kubetune_operator.search import total_trials as planned_trials
from kubetune_operator.status import format_number

# Condition types of a sweep.
COMPLETE = "Complete"  # every trial ended (True) or not yet (False)
FAILED = c.FAILED  # the failure budget is spent
# Reasons
TRIALS_RUNNING = "TrialsRunning"
ALL_TRIALS_ENDED = "AllTrialsEnded"
FAILURE_BUDGET_SPENT = "FailureBudgetSpent"
NO_TRIAL_SUCCEEDED = "NoTrialSucceeded"
WITHIN_BUDGET = "WithinBudget"


def desired_trial(body: Obj, spec: FineTuningSweepSpec, number: int, values: dict) -> Obj:
    meta = body["metadata"]
    trial = trial_spec(spec.template, values)
    trial = trial.model_copy(
        update={"registration": trial.registration.model_copy(update={"enabled": False})}
    )
    return {
        "apiVersion": body["apiVersion"],
        "kind": ftj.KIND,
        "metadata": {
            "name": naming.trial_name(meta["name"], number),
            "namespace": meta["namespace"],
            "labels": {
                naming.LABEL_NAME: "kubetune",
                naming.LABEL_PART_OF: "kubetune",
                naming.LABEL_MANAGED_BY: naming.MANAGER,
                naming.LABEL_COMPONENT: "trial",
                naming.LABEL_SWEEP_NAME: naming.label_value(meta["name"]),
                naming.LABEL_SWEEP_UID: meta["uid"],
            },
            "annotations": {
                naming.ANNOTATION_TRIAL_NUMBER: str(number),
                naming.ANNOTATION_TRIAL_PARAMETERS: parameters_annotation(values),
            },
            "ownerReferences": [naming.owner_reference(body)],
        },
        "spec": trial.to_api(),
    }


HISTORY_MAX = 200


def observed_trials(
    body: Obj,
    spec: FineTuningSweepSpec,
    children: list[Obj],
    previous: FineTuningSweepStatus | None = None,
) -> list[Trial]:
    """The sweep's own trials (controller checked), as the search sees them; each with
    the validation losses seen so far (kept in the sweep's status between looks)."""
    uid = body["metadata"]["uid"]
    seen = {r.number: r.history for r in (previous.trials if previous else [])}
    trials = []
    for child in children:
        if not obs.controlled_by(child, uid):
            continue
        annotations = child["metadata"].get("annotations") or {}
        try:
            number = int(annotations.get(naming.ANNOTATION_TRIAL_NUMBER, ""))
        except ValueError:
            continue
        status = child.get("status") or {}
        objective = (status.get("metrics") or {}).get(spec.objective.metric)
        history = {int(step): float(value) for step, value in seen.get(number, [])}
        progress = status.get("progress") or {}
        if progress.get("evalLoss") is not None and progress.get("step"):
            history[int(progress["step"])] = float(progress["evalLoss"])
        trials.append(
            Trial(
                number=number,
                parameters=parse_parameters(annotations.get(naming.ANNOTATION_TRIAL_PARAMETERS)),
                phase=status.get("phase") or "",
                objective=float(objective) if objective is not None else None,
                stopped=annotations.get(naming.ANNOTATION_STOPPED_EARLY) == "true",
                history=tuple(sorted(history.items()))[-HISTORY_MAX:],
            )
        )
    return sorted(trials, key=lambda t: t.number)


def derive_sweep_status(
    body: Obj,
    spec: FineTuningSweepSpec,
    previous: FineTuningSweepStatus,
    trials: list[Trial],
    plan: SearchPlan,
    best_model: str | None,
    now: datetime,
) -> FineTuningSweepStatus:
    meta = body["metadata"]
    generation = meta.get("generation", 1)
    status = previous.model_copy(deep=True)
    status.observed_generation = generation
    conds = c.Conditions(status.conditions, generation, now)
    status.trials = [
        TrialRecord(
            name=naming.trial_name(meta["name"], t.number),
            number=t.number,
            parameters={k: str(v) for k, v in sorted(t.parameters.items())},
            phase=t.phase or "Pending",
            objective=t.objective,
            stopped_early=t.stopped,
            history=[[step, value] for step, value in t.history],
        )
        for t in trials
    ]
    ended = sum(1 for t in trials if t.finished)
    status.trials_done = f"{ended}/{planned_trials(spec)}"
    best = plan.best
    status.best_trial = naming.trial_name(meta["name"], best.number) if best else None
    status.best_objective = best.objective if best else None
    status.best_objective_shown = format_number(best.objective) if best else ""
    status.best_model = best_model
    failures = sum(1 for t in trials if t.finished and t.failed)
    stopped = sum(1 for t in trials if t.stopped)
    if plan.failed:
        conds.set(
            FAILED,
            True,
            FAILURE_BUDGET_SPENT,
            f"{failures} trials failed, more than maxFailedTrials ({spec.max_failed_trials}); "
            "no more trials are started",
        )
    else:
        conds.set(FAILED, False, WITHIN_BUDGET, f"{failures} failed trials so far")
    if plan.done:
        conds.set(
            COMPLETE, True, ALL_TRIALS_ENDED, f"{ended} trials ended ({stopped} stopped early)"
        )
        status.completion_time = status.completion_time or now
        status.phase = SweepPhase.FAILED if plan.failed or best is None else SweepPhase.SUCCEEDED
        if best is None and not plan.failed:
            conds.set(FAILED, True, NO_TRIAL_SUCCEEDED, "no trial reported the objective")
    else:
        running = sum(1 for t in trials if not t.finished)
        conds.set(COMPLETE, False, TRIALS_RUNNING, f"{running} running, {ended} ended")
        status.phase = SweepPhase.RUNNING
    status.conditions = conds.as_list()
    return status


def models_to_keep(spec: FineTuningSweepSpec, plan: SearchPlan, trials: list[Trial]) -> list[int]:
    """The trial numbers whose models are registered once the sweep ended."""
    if not plan.done or plan.best is None:
        return []
    if spec.model_policy == ModelPolicy.KEEP_ALL:
        return [t.number for t in trials if t.phase == "Succeeded"]
    return [plan.best.number]


def trial_model(trial: Obj, best: bool, sweep_name: str, now: datetime) -> Obj | None:
    """The RegisteredModel of a succeeded trial, from its status (its pods and Jobs may
    be gone by now). None if the status lacks what a record needs."""
    try:
        spec = FineTuningJobSpec.model_validate(trial["spec"])
        status = FineTuningJobStatus.model_validate(trial.get("status") or {})
    except ValidationError:
        return None
    if status.artifact is None or status.hyperparameters is None:
        return None
    meta = trial["metadata"]
    folder = spec.output.job_location(meta["name"], meta["uid"]).path.strip("/")
    path = status.artifact.volume.path.strip("/")
    result = ResultReport(
        artifact=ResultArtifact(
            path=path[len(folder) :].strip("/") if path.startswith(folder) else path,
            kind=status.artifact.kind,
            digest=status.artifact.digest,
        ),
        metrics=dict(status.metrics),
        dataset_digest=status.dataset_digest or "",
        completed_at=status.completion_time or now,
        hyperparameters=status.hyperparameters,
    )
    model = desired_registered_model(
        trial, spec, status, result, status.completion_time or result.completed_at
    )
    labels = model["metadata"]["labels"]
    labels[naming.LABEL_SWEEP_NAME] = naming.label_value(sweep_name)
    if best:
        labels[naming.LABEL_SWEEP_BEST] = "true"
    return model
