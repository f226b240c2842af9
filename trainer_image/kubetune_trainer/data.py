"""The dataset as the trainer and the SDK see it: load, preprocess, split, convert, digest."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.api.finetuningjob import (
    FILE_FORMATS,
    DatasetFormat,
    DatasetSpec,
    FieldMapping,
    PreprocessingStep,
)
from kubetune_trainer.errors import InvalidConfig, InvalidDataset
from kubetune_trainer.preprocessing import PipelineContext, StepResult, run_pipeline
from kubetune_trainer.records import Record, columns_of, resolve_shape
from kubetune_trainer.sources import (
    TEXT_COLUMN,
    TextMode,
    read_custom_records,
    read_file_records,
    read_huggingface_records,
)

CONVERTIBLE = (DatasetFormat.JSONL, DatasetFormat.CSV, DatasetFormat.TEXT)


def load_records(
    dataset: DatasetSpec,
    *,
    local_path: str | None,
    cache_dir: str | None = None,
    text_mode: TextMode = "auto",
) -> list[Record]:
    """Every row of the job's dataset, in source order."""
    fmt = DatasetFormat(dataset.format)
    if fmt in FILE_FORMATS:
        if not local_path:
            raise InvalidConfig(f"dataset format {fmt.value} needs a dataset path")
        return read_file_records(local_path, fmt, text_mode=text_mode)
    if fmt == DatasetFormat.HUGGINGFACE:
        if dataset.hugging_face is None:
            raise InvalidConfig("dataset.huggingFace is required for format HUGGINGFACE")
        return read_huggingface_records(
            dataset.hugging_face, local_path=local_path, cache_dir=cache_dir
        )
    if dataset.custom is None:
        raise InvalidConfig("dataset.custom is required for format CUSTOM")
    return read_custom_records(dataset.custom, local_path=local_path)


def split_records(
    records: Sequence[Record], validation_split: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """A seeded train/eval split; eval gets round(n * split) rows, at least one when enabled."""
    if validation_split <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    eval_count = min(len(records) - 1, max(1, round(len(records) * validation_split)))
    eval_indices = set(order[:eval_count])
    train = [r for i, r in enumerate(records) if i not in eval_indices]
    evaluation = [r for i, r in enumerate(records) if i in eval_indices]
    return train, evaluation


def records_digest(*parts: Sequence[Record]) -> str:
    """sha256 of the prepared rows (canonical JSON lines), train then eval."""
    digest = hashlib.sha256()
    for part_index, part in enumerate(parts):
        digest.update(f"--part {part_index}\n".encode())
        for record in part:
            line = json.dumps(record.fields, sort_keys=True, ensure_ascii=False, default=str)
            digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def write_records(
    records: Sequence[Record], path: str | Path, fmt: DatasetFormat, *, text_mode: TextMode = "auto"
) -> None:
    """Write rows as JSONL, CSV (nested values as JSON) or TEXT (one text column)."""
    fmt = DatasetFormat(fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == DatasetFormat.JSONL:
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record.fields, ensure_ascii=False) + "\n")
    elif fmt == DatasetFormat.CSV:
        columns = columns_of(records)
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for record in records:
                writer.writerow({c: _csv_cell(record.fields.get(c)) for c in columns})
    elif fmt == DatasetFormat.TEXT:
        _write_text(records, path, text_mode)
    else:
        raise InvalidConfig(
            f"cannot write format {fmt.value}: conversion supports "
            f"{', '.join(f.value for f in CONVERTIBLE)}"
        )


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _write_text(records: Sequence[Record], path: Path, text_mode: TextMode) -> None:
    shape = resolve_shape(FieldMapping(), columns_of(records)) if records else None
    if shape is not None and shape.kind != "text":
        raise InvalidDataset(
            f"TEXT holds plain text only; these rows are {shape.describe()} (use a template "
            "transform to make one text column first)"
        )
    column = shape.text if shape else TEXT_COLUMN
    texts = []
    for record in records:
        value = record.fields.get(column)
        if not isinstance(value, str) or not value.strip():
            raise InvalidDataset(f"{record.where}: field {column!r} must be non-empty text")
        texts.append(value)
    multiline = any("\n" in t for t in texts)
    if text_mode == "auto":
        text_mode = "block" if multiline else "line"
    if text_mode == "line" and multiline:
        raise InvalidDataset("line mode cannot hold texts with newlines: use block mode")
    if text_mode == "block" and any("\n\n" in t or t != t.strip() for t in texts):
        raise InvalidDataset(
            "block mode cannot hold texts with blank lines or surrounding whitespace"
        )
    separator = "\n\n" if text_mode == "block" else "\n"
    path.write_text(separator.join(texts) + ("\n" if texts else ""), encoding="utf-8")


def convert(
    src: str | Path,
    src_format: DatasetFormat | str,
    dst: str | Path,
    dst_format: DatasetFormat | str,
    steps: Sequence[PreprocessingStep | dict] | None = None,
    *,
    fields: FieldMapping | dict | None = None,
    text_mode: TextMode = "auto",
    tokenizer: Any = None,
    seed: int = 42,
) -> list[StepResult]:
    """Convert a dataset file between JSONL, CSV and TEXT, applying preprocessing steps.

    Returns one StepResult per step. TEXT rows have a single `text` column; TEXT
    files hold one example per line, or per blank-line-separated block
    (`text_mode`; "auto" picks blocks when the source has blank lines between text)."""
    src_format, dst_format = DatasetFormat(src_format), DatasetFormat(dst_format)
    for fmt in (src_format, dst_format):
        if fmt not in CONVERTIBLE:
            raise InvalidConfig(
                f"format {fmt.value} cannot be converted; supported: "
                f"{', '.join(f.value for f in CONVERTIBLE)}"
            )
    records = read_file_records(src, src_format, text_mode=text_mode)
    parsed_steps = [
        s if isinstance(s, PreprocessingStep) else PreprocessingStep.model_validate(s)
        for s in steps or []
    ]
    mapping = (
        fields
        if isinstance(fields, FieldMapping) or fields is None
        else FieldMapping.model_validate(fields)
    )
    context = PipelineContext(fields=mapping, tokenizer=tokenizer, seed=seed)
    records, results = run_pipeline(records, parsed_steps, context)
    output_mode = text_mode if src_format == DatasetFormat.TEXT else "auto"
    write_records(records, dst, dst_format, text_mode=output_mode)
    return results
