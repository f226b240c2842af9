"""FineTuningSweep: a hyperparameter search over FineTuningJobs.

A sweep holds a FineTuningJob spec template, a search space over some of its
fields, an algorithm (grid, random, or Bayesian: Optuna's samplers) and an
objective, a metric the trials report. The operator creates the trials as
FineTuningJobs owned by the sweep, never more than `parallelism` at once nor
`maxTrials` in all, and records each trial's parameters on the trial itself, so
the search is rebuilt from the trials that exist after any restart.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field

from kubetune.api.common import (
    CONDITIONS_LIST_MAP,
    LIST_MAX,
    NAME_MAX,
    ApiModel,
    Condition,
    cel,
    validations,
)
from kubetune.api.finetuningjob import FineTuningJobSpec

KIND = "FineTuningSweep"
PLURAL = "finetuningsweeps"
SHORT_NAME = "fts"

# The sections of the template a search may vary, and the fields in each: those
# that change how training goes, not where it runs or what it reads.
SEARCHABLE_SECTIONS = ("hyperparameters", "lora", "quantization", "prefixTuning", "promptTuning")
OPTIONAL_SECTIONS = ("lora", "quantization", "prefixTuning", "promptTuning")
EXCLUDED_FIELDS = {"saveSteps", "loggingSteps", "evalSteps"}  # bookkeeping, not the search


def _scalar(annotation: Any) -> bool:
    """int, float, str, bool, an enum or a literal, possibly optional or "auto"; not a list."""
    origin = get_origin(annotation)
    if origin is None:
        return isinstance(annotation, type) and issubclass(annotation, (int, float, str, bool))
    if origin is Literal:
        return True
    if origin is Annotated:
        return _scalar(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return all(_scalar(a) for a in get_args(annotation) if a is not type(None))
    return False


def searchable_paths() -> list[str]:
    """Every `section.field` of a FineTuningJob spec that a sweep may search over."""
    paths = ["seed"]
    for field_name, field in FineTuningJobSpec.model_fields.items():
        section = field.alias or field_name
        if section not in SEARCHABLE_SECTIONS:
            continue
        model = next(
            a
            for a in (field.annotation, *get_args(field.annotation))
            if isinstance(a, type) and issubclass(a, BaseModel)
        )
        for name, sub in model.model_fields.items():
            alias = sub.alias or name
            if alias not in EXCLUDED_FIELDS and _scalar(sub.annotation):
                paths.append(f"{section}.{alias}")
    return paths


class ParameterType(StrEnum):
    LOG_UNIFORM = "logUniform"  # a float between min and max, drawn on a log scale
    UNIFORM = "uniform"  # a float between min and max
    INT = "int"  # an integer from min to max (inclusive), every `step`
    CATEGORICAL = "categorical"  # one of `values`


class SearchParameter(ApiModel):
    """One field of the template and the values it may take."""

    path: str = Field(
        description="The field, as section.field of the FineTuningJob spec (e.g. "
        "hyperparameters.learningRate, lora.rank).",
        json_schema_extra={"enum": searchable_paths()},
    )
    type: ParameterType = Field(description="logUniform, uniform, int or categorical.")
    min: float | None = Field(default=None, description="Lowest value (not for categorical).")
    max: float | None = Field(default=None, description="Highest value (not for categorical).")
    step: int | None = Field(
        default=None, description="For int: the spacing of the values (default 1).", ge=1
    )
    values: list[str] | None = Field(
        default=None,
        description='For categorical: the choices, as text ("16", "cosine", "true"); each '
        "is read as the field's type.",
        min_length=1,
        max_length=LIST_MAX,
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.type == 'categorical' ? has(self.values) && !has(self.min) && !has(self.max)"
                " : has(self.min) && has(self.max) && !has(self.values)",
                "categorical takes values; logUniform, uniform and int take min and max",
            ),
            cel(
                "self.type == 'categorical' || self.min < self.max",
                "the range is empty: min must be below max",
                field_path=".max",
            ),
            cel(
                "self.type != 'logUniform' || self.min > 0.0",
                "a logUniform range must be above 0",
                field_path=".min",
            ),
            cel(
                "self.type == 'int' || !has(self.step)",
                "step applies to int parameters only",
                field_path=".step",
            ),
        )
    }


class Algorithm(StrEnum):
    GRID = "grid"  # every combination, in order (int and categorical parameters)
    RANDOM = "random"  # independent draws
    BAYESIAN = "bayesian"  # Optuna's TPE: draws where good trials were


class Direction(StrEnum):
    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"


class Objective(ApiModel):
    """What the sweep optimises: a metric in each trial's status.metrics."""

    metric: str = Field(
        description="A key of the trials' status.metrics, e.g. eval_loss or eval_contains "
        "(spec.evaluation's metrics are eval_<metric>).",
        min_length=1,
        max_length=NAME_MAX,
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    direction: Direction = Field(description="minimize or maximize.")


class EarlyStopping(ApiModel):
    """The median stopping rule: a running trial is stopped once its best validation loss
    so far is worse than the median of the other trials' best validation loss by the same
    step. It reads the trials' status.progress.evalLoss, so the template needs a
    validation split (and hyperparameters.evalSteps for more than one look per epoch)."""

    min_trials: int = Field(
        default=2,
        description="Compare only against at least this many other trials that reached the step.",
        ge=1,
        le=1000,
    )
    min_steps: int = Field(
        default=1,
        description="Never stop a trial before it has done this many optimizer steps.",
        ge=0,
        le=10_000_000,
    )


class ModelPolicy(StrEnum):
    KEEP_ALL = "keepAll"  # every succeeded trial registers its model
    BEST_ONLY = "bestOnly"  # only the best trial registers one


class FineTuningSweepSpec(ApiModel):
    """A search over FineTuningJob settings."""

    template: FineTuningJobSpec = Field(
        description="The FineTuningJob spec each trial starts from."
    )
    parameters: list[SearchParameter] = Field(
        description="The fields to search over and their ranges.",
        min_length=1,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["path"]},
    )
    algorithm: Algorithm = Field(
        default=Algorithm.BAYESIAN, description="grid, random or bayesian."
    )
    objective: Objective = Field(description="The metric to optimise and its direction.")
    max_trials: int = Field(default=10, description="Trials in all.", ge=1, le=1000)
    parallelism: int = Field(default=2, description="Trials running at once.", ge=1, le=100)
    max_failed_trials: int = Field(
        default=3,
        description="The sweep fails once this many trials failed (a failed trial is recorded "
        "and the search goes on until then).",
        ge=0,
        le=1000,
    )
    early_stopping: EarlyStopping | None = Field(
        default=None, description="Stop bad trials early (median rule); off when left out."
    )
    model_policy: ModelPolicy = Field(
        default=ModelPolicy.BEST_ONLY,
        description="bestOnly: only the best trial registers its model (the others' weights "
        "stay on the volume); keepAll: every succeeded trial does.",
    )
    seed: int = Field(default=0, description="Seeds the sampler.", ge=0, le=2**32 - 1)

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            *(
                cel(
                    f"self.parameters.all(p, !p.path.startsWith('{section}.')) "
                    f"|| has(self.template.{section})",
                    f"a parameter varies {section}, and the template has no {section} section: "
                    f"add one (or search another field)",
                    field_path=".parameters",
                )
                for section in OPTIONAL_SECTIONS
            ),
            cel(
                "!has(self.earlyStopping) || !has(self.template.dataset.validationSplit) "
                "|| self.template.dataset.validationSplit > 0.0",
                "early stopping compares validation losses: the template needs a "
                "dataset.validationSplit above 0",
                field_path=".earlyStopping",
            ),
            cel(
                "self.algorithm != 'grid' "
                "|| self.parameters.all(p, p.type == 'int' || p.type == 'categorical')",
                "grid search needs int or categorical parameters (list the float values you "
                "want as categorical)",
                field_path=".algorithm",
            ),
        )
    }


class SweepPhase(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"  # every trial ended; the best is known
    FAILED = "Failed"  # too many trials failed, or none succeeded


class TrialRecord(ApiModel):
    """One trial, as the sweep's status lists it."""

    name: str = Field(description="The trial's FineTuningJob.", max_length=NAME_MAX)
    number: int = Field(description="Trial number, from 0.", ge=0)
    parameters: dict[str, str] = Field(
        default_factory=dict, description="The values tried (path to value, as text)."
    )
    phase: str = Field(default="", description="The trial's phase.", max_length=32)
    objective: float | None = Field(default=None, description="The objective it reached.")
    stopped_early: bool = Field(default=False, description="Stopped by the median rule.")
    history: list[list[float]] = Field(
        default_factory=list,
        description="[step, validation loss] pairs seen while it ran (for early stopping).",
        max_length=200,
    )


class FineTuningSweepStatus(ApiModel):
    """Observed state, written by the operator only."""

    phase: SweepPhase = Field(default=SweepPhase.RUNNING, description="Display summary.")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Detailed state.",
        max_length=8,
        json_schema_extra=CONDITIONS_LIST_MAP,
    )
    trials: list[TrialRecord] = Field(
        default_factory=list, description="Every trial so far.", max_length=1000
    )
    trials_done: str = Field(
        default="", description="Ended trials / maxTrials, for display.", max_length=32
    )
    best_trial: str | None = Field(default=None, description="The best trial's FineTuningJob.")
    best_objective: float | None = Field(default=None, description="Its objective.")
    best_objective_shown: str = Field(
        default="", description="The best objective, 4 significant digits.", max_length=32
    )
    best_model: str | None = Field(default=None, description="Its RegisteredModel.")
    completion_time: datetime | None = Field(default=None, description="When the sweep ended.")


class FineTuningSweep(ApiModel):
    """A hyperparameter search over fine-tuning jobs."""

    api_version: str = Field(default="kubetune.dev/v1alpha1", description="kubetune.dev/v1alpha1")
    kind: str = Field(default=KIND, description=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: FineTuningSweepSpec = Field(description="The search.")
    status: FineTuningSweepStatus | None = Field(default=None, description="Observed state.")
