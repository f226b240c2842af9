"""What the SDK reports about a job."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from kubetune.api.evaluation import EvaluationResult, shown

Status = Literal["created", "running", "completed", "failed", "cancelled"]
TERMINAL: tuple[str, ...] = ("completed", "failed", "cancelled")

# FineTuningJob phase -> SDK status.
PHASE_STATUS: dict[str, Status] = {
    "Pending": "created",
    "Validating": "running",
    "Queued": "running",
    "Suspended": "running",
    "Running": "running",
    "Succeeded": "completed",
    "Failed": "failed",
    "Cancelled": "cancelled",
}


class FineTuningResult(BaseModel):
    """A job's state: status, timing, metrics, error and progress."""

    job_id: str
    model_id: str
    fine_tuned_model_id: str | None = None
    status: Status = "created"
    start_time: datetime | None = None
    end_time: datetime | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    # spec.evaluation's results: each metric for the base and the fine-tuned model.
    evaluation: EvaluationResult | None = None
    error: str | None = None
    # Progress, as last reported by the trainer.
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eta_seconds: int | None = None
    # Where it runs.
    backend: Literal["local", "cluster"] = "local"
    phase: str | None = None
    namespace: str | None = None
    output_dir: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def progress(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": self.loss,
            "eta_seconds": self.eta_seconds,
        }

    def evaluation_table(self) -> str:
        """The evaluation as text: one line per metric, base -> fine-tuned."""
        return evaluation_table(self.evaluation)


def evaluation_table(evaluation: EvaluationResult | None) -> str:
    if evaluation is None:
        return ""
    if evaluation.error:
        return f"evaluation failed: {evaluation.error}"

    width = max([len("metric"), *(len(name) for name in evaluation.metrics)])
    lines = [f"{'metric':<{width}}  {'base':>8}  {'tuned':>8}  {'change':>8}"]
    for name, value in evaluation.metrics.items():
        change = "" if value.base is None else f"{value.tuned - value.base:+.4g}"
        lines.append(
            f"{name:<{width}}  {shown(value.base):>8}  {shown(value.tuned):>8}  {change:>8}"
        )
    lines.append(f"({evaluation.examples} examples, {evaluation.dataset_digest or 'no digest'})")
    return "\n".join(lines)
