"""Evaluation: whether the fine-tune made the model better, measured after training.

`spec.evaluation` names held-out examples (a file on a volume, a Hub dataset,
or the validation split), the metrics to compute on them and, by default, the
same metrics on the base model, so that the gain is a number. The trainer
evaluates in the training pod once the model is saved; the results reach the
status, the RegisteredModel, the model card and a per-example report file.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from kubetune.api.common import TEXT_MAX, ApiModel, VolumeLocation, cel, validations
from kubetune.api.data import FieldMapping, HuggingFaceDataset


class EvaluationMetric(StrEnum):
    """What to measure on the evaluation examples."""

    # On the reference completions (teacher forcing): cheap.
    LOSS = "loss"
    PERPLEXITY = "perplexity"
    TOKEN_ACCURACY = "token_accuracy"  # share of completion tokens predicted exactly
    # On text generated from each prompt: slower, and what a user reads.
    EXACT_MATCH = "exact_match"  # output equals the reference (normalised)
    CONTAINS = "contains"  # the reference appears in the output (normalised)
    ROUGE_L = "rouge_l"  # ROUGE-L F-measure against the reference
    REGEX = "regex"  # the output matches evaluation.regex
    JSON_SCHEMA = "json_schema"  # the output is JSON valid against evaluation.jsonSchema


TEACHER_FORCED_METRICS = (
    EvaluationMetric.LOSS,
    EvaluationMetric.PERPLEXITY,
    EvaluationMetric.TOKEN_ACCURACY,
)
GENERATION_METRICS = tuple(m for m in EvaluationMetric if m not in TEACHER_FORCED_METRICS)
# Higher is better for every metric but these.
LOWER_IS_BETTER = (EvaluationMetric.LOSS, EvaluationMetric.PERPLEXITY)


class EvaluationDataFormat(StrEnum):
    JSONL = "JSONL"
    CSV = "CSV"
    PARQUET = "PARQUET"
    HUGGINGFACE = "HUGGINGFACE"


class EvaluationData(ApiModel):
    """Held-out examples with a prompt and a reference completion (or chat messages
    whose last assistant turn is the reference)."""

    format: EvaluationDataFormat = Field(description="JSONL, CSV, PARQUET or HUGGINGFACE.")
    volume: VolumeLocation | None = Field(
        default=None, description="File holding the examples (JSONL, CSV, PARQUET)."
    )
    hugging_face: HuggingFaceDataset | None = Field(
        default=None, alias="huggingFace", description="Dataset on the Hub (HUGGINGFACE)."
    )
    fields: FieldMapping | None = Field(
        default=None,
        description="Columns holding prompt and reference, or messages (default: those of "
        "spec.dataset.fields).",
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "(self.format != 'HUGGINGFACE') == has(self.volume)",
                "volume is required for JSONL, CSV and PARQUET evaluation data, and only for them",
                field_path=".volume",
            ),
            cel(
                "(self.format == 'HUGGINGFACE') == has(self.huggingFace)",
                "huggingFace is required for format HUGGINGFACE, and only for it",
                field_path=".huggingFace",
            ),
        )
    }


class GenerationSettings(ApiModel):
    """How outputs are generated for the generation metrics."""

    max_new_tokens: int = Field(default=64, description="Longest output, in tokens.", ge=1, le=4096)
    temperature: float = Field(
        default=0.0,
        description="0 (the default): greedy decoding, the same output every run; above 0: "
        "sampling, seeded by spec.seed.",
        ge=0.0,
        le=2.0,
    )
    top_p: float = Field(
        default=1.0, description="Nucleus sampling (with temperature > 0).", gt=0.0, le=1.0
    )
    batch_size: int = Field(default=8, description="Prompts generated at once.", ge=1, le=256)


class EvaluationSpec(ApiModel):
    """What to evaluate the trained model on, and how."""

    data: EvaluationData | None = Field(
        default=None,
        description="The evaluation examples (default: the validation split of spec.dataset).",
    )
    metrics: list[EvaluationMetric] = Field(
        default_factory=lambda: list(TEACHER_FORCED_METRICS),
        description="loss, perplexity, token_accuracy (on the reference completions); "
        "exact_match, contains, rouge_l, regex, json_schema (on generated outputs).",
        min_length=1,
        max_length=len(EvaluationMetric),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    max_examples: int = Field(
        default=200,
        description="Evaluate on at most this many examples (the first ones, in file order).",
        ge=1,
        le=100_000,
    )
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="Decoding for the generation metrics."
    )
    regex: str | None = Field(
        default=None,
        description="For the regex metric: a Python regular expression the output must "
        "contain a match of (anchor it with ^ and $ to match the whole output).",
        min_length=1,
        max_length=1000,
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="For the json_schema metric: the JSON Schema the output must satisfy.",
    )
    compare_base: bool = Field(
        default=True,
        description="Also evaluate the base model on the same examples, so that the gain is "
        "measured.",
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "('regex' in self.metrics) == has(self.regex)",
                "set regex exactly when metrics lists regex",
                field_path=".regex",
            ),
            cel(
                "('json_schema' in self.metrics) == has(self.jsonSchema)",
                "set jsonSchema exactly when metrics lists json_schema",
                field_path=".jsonSchema",
            ),
        )
    }


class MetricResult(ApiModel):
    """One metric on the evaluation examples, for the tuned and the base model."""

    tuned: float = Field(description="The fine-tuned model's value.")
    base: float | None = Field(default=None, description="The base model's value, if evaluated.")


class EvaluationResult(ApiModel):
    """What the evaluation measured."""

    examples: int = Field(default=0, ge=0, description="Examples evaluated.")
    dataset_digest: str = Field(
        default="", description="sha256 of the evaluation examples.", max_length=128
    )
    metrics: dict[str, MetricResult] = Field(
        default_factory=dict, description="Each metric, tuned and base."
    )
    report: VolumeLocation | None = Field(
        default=None,
        description="Per-example report (JSON Lines: prompt, reference, base and tuned output, "
        "scores).",
    )
    error: str | None = Field(
        default=None,
        description="Why the evaluation failed (the trained model is kept and registered).",
        max_length=TEXT_MAX,
    )
    evaluated_at: datetime | None = Field(default=None, description="When it finished.")


def flat_metrics(result: EvaluationResult) -> dict[str, float]:
    """`eval_<metric>` and `base_eval_<metric>`, the names of status.metrics."""
    flat: dict[str, float] = {}
    for name, value in result.metrics.items():
        flat[f"eval_{name}"] = value.tuned
        if value.base is not None:
            flat[f"base_eval_{name}"] = value.base
    return flat


def shown(value: float | None) -> str:
    """A metric's value as the summary, the CLI table and the model card print it."""
    return "-" if value is None else f"{value:.4g}"


def summary(result: EvaluationResult) -> str:
    """'contains 0.05 -> 0.85, rouge_l 0.12 -> 0.71 on 16 examples'."""
    parts = [
        f"{name} {shown(value.base)} -> {shown(value.tuned)}"
        if value.base is not None
        else f"{name} {shown(value.tuned)}"
        for name, value in result.metrics.items()
    ]
    return f"{', '.join(parts)} on {result.examples} examples"
