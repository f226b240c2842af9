"""spec.evaluation's results from the trainer into status, condition and RegisteredModel;
progress numbers rounded for `kubectl get`."""

from __future__ import annotations

import pytest
from kubetune_operator import conditions as c
from kubetune_operator.observed import Observed
from kubetune_operator.plan import plan
from kubetune_operator.status import format_number, format_rate

from kubetune.api.evaluation import EvaluationResult, MetricResult
from kubetune.api.trainer import ProgressReport, ResultArtifact, ResultReport
from tests.unit.operator.conftest import NOW, SPEC, condition, job, make_body, parse, pod
from tests.unit.operator.test_status import SETTINGS, conds, derive, validated_job

EVALUATED_SPEC = {**SPEC, "evaluation": {"metrics": ["loss", "contains"]}}


def result(evaluation: EvaluationResult | None, report_path: str | None = "evaluation.jsonl"):
    return ResultReport(
        artifact=ResultArtifact(path="model", kind="adapter", digest="sha256:abc"),
        metrics={"train_loss": 1.5, "eval_loss": 1.7},
        dataset_digest="sha256:data",
        completed_at=NOW,
        evaluation=evaluation,
        evaluation_report_path=report_path,
    )


def finished(report: ResultReport, spec=EVALUATED_SPEC, **extra):
    body = make_body(spec)
    observed = dict(
        validate_job=validated_job(),
        train_job=job("run-1-train", conditions=[condition("Complete")], start=True),
        report={"result": report.model_dump_json(by_alias=True)},
        **extra,
    )
    return body, observed, derive(body, **observed)


MEASURED = EvaluationResult(
    examples=16,
    dataset_digest="sha256:eval",
    metrics={
        "loss": MetricResult(tuned=0.8, base=2.5),
        "contains": MetricResult(tuned=0.875, base=0.0625),
    },
    evaluated_at=NOW,
)


def test_evaluation_reaches_status_metrics_condition_and_model() -> None:
    body, observed, status = finished(result(MEASURED))
    evaluated = conds(status)[c.EVALUATED]
    assert (evaluated.status, evaluated.reason) == ("True", c.EVALUATION_COMPLETE)
    assert evaluated.message == "loss 2.5 -> 0.8, contains 0.0625 -> 0.875 on 16 examples"
    assert status.metrics == {
        "train_loss": 1.5,
        "eval_loss": 0.8,  # the evaluation set's, measured after training
        "base_eval_loss": 2.5,
        "eval_contains": 0.875,
        "base_eval_contains": 0.0625,
    }
    # The report is found next to the model, in the job's own folder.
    assert status.evaluation.report.path == "out/run-1/run-1-uid/evaluation.jsonl"
    model = plan(body, parse(body), status, Observed(now=NOW, **observed), SETTINGS).register
    recorded = model["spec"]["evaluation"]
    assert recorded["datasetDigest"] == "sha256:eval"
    assert recorded["metrics"]["contains"] == {"tuned": 0.875, "base": 0.0625}
    assert recorded["report"] == {
        "claimName": "models",
        "path": "out/run-1/run-1-uid/evaluation.jsonl",
    }
    assert model["spec"]["metrics"]["base_eval_contains"] == 0.0625


def test_a_failed_evaluation_is_a_condition_and_the_job_still_succeeds() -> None:
    failed = EvaluationResult(examples=16, error="evaluation failed after training (OOM)")
    body, observed, status = finished(result(failed, report_path=None))
    assert conds(status)[c.SUCCEEDED].status == "True"
    evaluated = conds(status)[c.EVALUATED]
    assert (evaluated.status, evaluated.reason) == ("False", c.EVALUATION_FAILED)
    assert "OOM" in evaluated.message
    assert status.failure is None
    assert "eval_contains" not in status.metrics
    model = plan(body, parse(body), status, Observed(now=NOW, **observed), SETTINGS).register
    assert model is not None and model["spec"]["evaluation"]["error"].startswith(
        "evaluation failed"
    )


def test_no_evaluation_asked_no_condition() -> None:
    _, _, status = finished(result(None, None), spec=SPEC)
    assert c.EVALUATED not in conds(status)
    assert status.evaluation is None


@pytest.mark.parametrize(
    ("value", "shown"),
    [(6.039865016937256, "6.04"), (0.000123456, "0.0001235"), (12345.678, "1.235e+04"), (None, "")],
)
def test_numbers_are_rounded_for_display(value, shown) -> None:
    assert format_number(value) == shown


@pytest.mark.parametrize(
    ("value", "shown"), [(987.6, "988"), (1234.5, "1.23k"), (2_500_000.0, "2.5M"), (None, "")]
)
def test_rates_are_rounded_for_display(value, shown) -> None:
    assert format_rate(value) == shown


def test_progress_display_fields() -> None:
    progress = ProgressReport(
        step=3,
        total_steps=60,
        loss=6.039865016937256,
        eval_loss=5.912345,
        tokens_per_second=1234.5,
        timestamp=NOW,
    )
    status = derive(
        make_body(),
        validate_job=validated_job(),
        train_job=job("run-1-train", start=True),
        train_pods=[pod("t", "Running")],
        report={"progress": progress.model_dump_json(by_alias=True)},
    )
    display = status.progress.display
    assert (display.loss, display.eval_loss, display.tokens_per_second) == (
        "6.04",
        "5.912",
        "1.23k",
    )
    assert status.progress.loss == 6.039865016937256  # the full value stays
