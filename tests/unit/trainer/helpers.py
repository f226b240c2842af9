"""Helpers shared by the trainer tests: a fixed tiny task and TrainerConfig builders."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.api.finetuningjob import Hyperparameters
from kubetune.api.trainer import TrainerConfig

CAPITALS = [
    ("capital of france", "paris"),
    ("capital of italy", "rome"),
    ("capital of japan", "tokyo"),
    ("capital of spain", "madrid"),
    ("color of the sun", "yellow"),
    ("color of the sea", "blue"),
    ("animal that says moo", "cow"),
    ("fruit that is yellow", "banana"),
]


def qa_rows(count: int = 64) -> list[dict[str, str]]:
    """A fixed tiny task: eight questions, each always with the same answer."""
    rows = []
    for index in range(count):
        question, answer = CAPITALS[index % len(CAPITALS)]
        rows.append({"question": f"Q: what is the {question}?\nA:", "answer": f" {answer}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


DEFAULT_HYPERPARAMETERS = {
    "epochs": 2,
    "maxSteps": None,
    "batchSize": 4,
    "gradientAccumulationSteps": 2,
    "effectiveBatchSize": 8,
    "learningRate": 2e-2,
    "lrScheduler": "constant",
    "warmupRatio": 0.0,
    "weightDecay": 0.0,
    "maxGradNorm": 1.0,
    "maxSeqLength": 64,
    "packing": True,
    "precision": "fp32",
    "gradientCheckpointing": False,
    "evalSteps": None,
    "saveSteps": 1000,
    "loggingSteps": 1,
    "seed": 7,
}


SPEC_HYPERPARAMETERS = {field.alias for field in Hyperparameters.model_fields.values()}


def make_config(
    tmp_path: Path,
    model_dir: Path,
    *,
    dataset: Path | None = None,
    method: str = "LORA",
    dataset_spec: dict | None = None,
    spec: dict | None = None,
    hyperparameters: dict | None = None,
    output: Path | None = None,
    evaluation_path: Path | None = None,
) -> TrainerConfig:
    if dataset is None:
        dataset = write_jsonl(tmp_path / "data" / "train.jsonl", qa_rows())
    dataset_document = {
        "format": "JSONL",
        "volume": {"claimName": "data"},
        "fields": {"prompt": "question", "completion": "answer"},
        "validationSplit": 0.125,
        **(dataset_spec or {}),
    }
    spec_document = {
        "baseModel": {"name": "tiny", "volume": {"claimName": "models"}},
        "dataset": dataset_document,
        "method": method,
        "output": {"volume": {"claimName": "out"}},
        "seed": 7,
        **(spec or {}),
    }
    output = output or tmp_path / "out"
    resolved = {**DEFAULT_HYPERPARAMETERS, **(hyperparameters or {})}
    # The spec says what the resolved values say, so the trainer's own resolution of
    # "auto" (from the model and the device) leaves them as they are.
    spec_document["hyperparameters"] = {
        key: value
        for key, value in resolved.items()
        if key in SPEC_HYPERPARAMETERS and value is not None
    } | spec_document.get("hyperparameters", {})
    return TrainerConfig.model_validate(
        {
            "job": {"name": "test-job", "namespace": "ns"},
            "spec": spec_document,
            "hyperparameters": resolved,
            "paths": {
                "baseModel": str(model_dir),
                "dataset": str(dataset) if dataset else None,
                "evaluation": str(evaluation_path) if evaluation_path else None,
                "output": str(output),
            },
            "report": {"file": str(output / "report.json")},
        }
    )


def write_config(config: TrainerConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.model_dump_json(by_alias=True), encoding="utf-8")
    return path
