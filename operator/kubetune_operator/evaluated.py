"""A finished job's evaluation (spec.evaluation), from the trainer's result into the status."""

from __future__ import annotations

from kubetune.api import evaluation
from kubetune.api.finetuningjob import FineTuningJobSpec, FineTuningJobStatus
from kubetune.api.trainer import ResultReport
from kubetune_operator import conditions as c


def record_evaluation(
    status: FineTuningJobStatus,
    conds: c.Conditions,
    spec: FineTuningJobSpec,
    result: ResultReport,
    meta: dict,
) -> None:
    """What spec.evaluation measured: into status.metrics, status.evaluation and the
    Evaluated condition. A failed evaluation is a condition only: the model stays."""
    if spec.evaluation is None:
        return
    found = result.evaluation
    if found is None:
        conds.set(
            c.EVALUATED, False, c.EVALUATION_FAILED, "the trainer reported no evaluation result"
        )
        return
    if result.evaluation_report_path:
        found = found.model_copy(
            update={
                "report": spec.output.job_location(
                    meta["name"], meta["uid"], result.evaluation_report_path
                )
            }
        )
    status.evaluation = found
    if found.error:
        conds.set(c.EVALUATED, False, c.EVALUATION_FAILED, found.error)
        return
    status.metrics.update(evaluation.flat_metrics(found))
    conds.set(c.EVALUATED, True, c.EVALUATION_COMPLETE, evaluation.summary(found))
