"""The contract between the operator and the trainer.

The operator renders a `TrainerConfig` from a FineTuningJob into an annotation
of the trainer's pod template, projected into the pod as a file; `kubetune
train --local` builds the same object from a manifest. The trainer reports
back through two channels that need no rights in the cluster at all:

* the operator's report endpoint: `POST <url>/v1/reports/<namespace>/<name>`
  with a JSON object `{"<key>": <document>}` (keys `progress`, `validation`,
  `result`, documents below), authenticated by the pod's projected
  service-account token whose audience is the operator's; the operator checks
  the token with a TokenReview and that the pod it is bound to works for that
  job;
* its container's termination message (`/dev/termination-log`), a
  `TrainerTermination` document, which the kubelet publishes in the pod
  status even when the operator cannot be reached.

Exit codes say whether a failure is worth retrying.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from kubetune.api.common import ApiModel
from kubetune.api.evaluation import EvaluationResult
from kubetune.api.finetuningjob import FineTuningJobSpec, ResolvedHyperparameters
from kubetune.api.merge import MergeReport

# Exit codes (sysexits.h). The Job's podFailurePolicy fails the job at once on
# these, without retries: running again cannot fix bad input.
EXIT_INVALID_CONFIG = 64  # EX_USAGE: the configuration cannot be used
EXIT_INVALID_DATASET = 65  # EX_DATAERR: the dataset is malformed
EXIT_INPUT_NOT_FOUND = 66  # EX_NOINPUT: the model or dataset does not exist
NON_RETRYABLE_EXIT_CODES = (EXIT_INVALID_CONFIG, EXIT_INVALID_DATASET, EXIT_INPUT_NOT_FOUND)

TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_MAX_BYTES = 4096
# The trainer's log, kept in the job's folder of the output volume: the pod's own log
# goes with the finished Job, the volume stays.
TRAINER_LOG_FILE = "trainer.log"

REPORT_PROGRESS_KEY = "progress"
REPORT_VALIDATION_KEY = "validation"
REPORT_RESULT_KEY = "result"
REPORT_KEYS = (REPORT_PROGRESS_KEY, REPORT_VALIDATION_KEY, REPORT_RESULT_KEY)
REPORTS_PATH = "/v1/reports"


class TrainerMode(StrEnum):
    VALIDATE = "validate"  # check the dataset only (CPU pod, before GPUs are requested)
    TRAIN = "train"
    MERGE = "merge"  # combine RegisteredModels (a ModelMerge's CPU pod; config: MergeConfig)


class JobIdentity(ApiModel):
    """The FineTuningJob a trainer works for."""

    name: str = Field(description="FineTuningJob name.")
    namespace: str = Field(default="default", description="FineTuningJob namespace.")
    uid: str = Field(default="", description="FineTuningJob UID.")
    generation: int = Field(default=1, description="Spec generation.")


class TrainerPaths(ApiModel):
    """Local paths where the trainer finds its inputs and writes its output."""

    base_model: str | None = Field(
        default=None, description="Folder of the base model (else the Hub)."
    )
    dataset: str | None = Field(default=None, description="Dataset file or folder (file formats).")
    evaluation: str | None = Field(
        default=None, description="File of the evaluation examples (spec.evaluation.data)."
    )
    output: str = Field(description="Folder for checkpoints and the trained model.")
    cache: str | None = Field(default=None, description="Hugging Face cache folder.")


class ReportEndpoint(ApiModel):
    """The operator's HTTPS endpoint for reports, and how the trainer proves who it is."""

    url: str = Field(description="Base URL of the operator's report endpoint.")
    token_file: str = Field(
        description="The pod's projected service-account token for the operator's audience."
    )
    ca_pem: str | None = Field(
        default=None, description="CA certificate(s) the endpoint's certificate is signed by."
    )


class ReportTarget(ApiModel):
    """Where the trainer reports progress and results."""

    endpoint: ReportEndpoint | None = Field(
        default=None, description="The operator's report endpoint (in a cluster)."
    )
    file: str | None = Field(default=None, description="Local JSON file (local runs).")


class TrainerConfig(ApiModel):
    """Everything the trainer needs: the job's spec with every auto resolved."""

    job: JobIdentity = Field(description="The job.")
    spec: FineTuningJobSpec = Field(description="The FineTuningJob's spec as written.")
    hyperparameters: ResolvedHyperparameters = Field(description="Resolved hyperparameters to use.")
    paths: TrainerPaths = Field(description="Input and output locations.")
    report: ReportTarget = Field(default_factory=ReportTarget, description="Where to report.")


class ProgressReport(ApiModel):
    """Progress, reported every few steps."""

    step: int = Field(ge=0, description="Optimizer steps done.")
    total_steps: int = Field(ge=0, description="Optimizer steps planned.")
    epoch: float = Field(default=0.0, ge=0, description="Epochs done.")
    loss: float | None = Field(default=None, description="Recent training loss.")
    eval_loss: float | None = Field(default=None, description="Latest validation loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, description="Real tokens per second.")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds left.")
    timestamp: datetime = Field(description="When this was measured.")
    hyperparameters: ResolvedHyperparameters | None = Field(
        default=None,
        description="What the trainer resolved auto to on its hardware and model, and why.",
    )


class ValidationReport(ApiModel):
    """What the dataset check found (mode validate)."""

    rows_read: int = Field(ge=0, description="Rows read from the source.")
    rows_kept: int = Field(ge=0, description="Rows left after preprocessing.")
    train_rows: int = Field(ge=0, description="Rows for training.")
    eval_rows: int = Field(ge=0, description="Rows for evaluation.")
    tokens: int = Field(default=0, ge=0, description="Tokens in the training rows.")
    digest: str = Field(description="sha256 of the prepared dataset.")
    steps: list[str] = Field(default_factory=list, description="One line per preprocessing step.")


class ResultArtifact(ApiModel):
    """The trained model, relative to the output volume."""

    path: str = Field(description="Folder of the model, relative to the output location.")
    kind: str = Field(description="adapter, full or merged.")
    digest: str = Field(description="sha256:<hex> over the weight files.")
    merged_path: str | None = Field(
        default=None, description="Folder of the merged model, if saved."
    )


class ResultReport(ApiModel):
    """The outcome of a successful run."""

    artifact: ResultArtifact = Field(description="What was written.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Final metrics.")
    dataset_digest: str = Field(default="", description="sha256 of the prepared dataset.")
    completed_at: datetime = Field(description="When training finished.")
    hyperparameters: ResolvedHyperparameters | None = Field(
        default=None, description="The hyperparameters the model was trained with."
    )
    evaluation: EvaluationResult | None = Field(
        default=None,
        description="What spec.evaluation measured (its report, if any, is at "
        "evaluationReportPath).",
    )
    evaluation_report_path: str | None = Field(
        default=None,
        description="The per-example evaluation report, relative to the output location.",
    )


class ErrorReport(ApiModel):
    """A failure the trainer understood: what is wrong and how to fix it."""

    reason: str = Field(description="InvalidDataset, InvalidConfig, InputNotFound or TrainerError.")
    message: str = Field(description="What is wrong, naming the field or row, and the fix.")


class TrainerTermination(ApiModel):
    """The termination message: the result or the error, in at most 4096 bytes."""

    result: ResultReport | None = Field(default=None, description="On success.")
    validation: ValidationReport | None = Field(default=None, description="After a dataset check.")
    merge: MergeReport | None = Field(default=None, description="After a merge (mode merge).")
    error: ErrorReport | None = Field(default=None, description="On failure.")
