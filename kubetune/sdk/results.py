"""What the SDK reports about a job."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

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
