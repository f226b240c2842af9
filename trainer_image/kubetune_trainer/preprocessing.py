"""The dataset pipeline of spec.dataset.preprocessing: filters, transforms, augmentation.

Each step takes the rows and returns new rows plus a `StepResult` that says how
many were kept, dropped and added.
"""

from __future__ import annotations

import json
import random
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kubetune.api.finetuningjob import FieldMapping, PreprocessingStep, PreprocessingType
from kubetune_trainer.errors import InputNotFound, InvalidConfig, InvalidDataset
from kubetune_trainer.expressions import Condition, ConditionError, EvaluationError
from kubetune_trainer.records import (
    ExampleShape,
    Record,
    columns_of,
    example_text,
    messages_of,
    resolve_shape,
    string_field,
)

TRANSFORMS = ("lowercase", "strip", "normalize_whitespace", "deduplicate", "truncate", "template")
AUGMENTATIONS = ("back_translation", "noise")


@dataclass(frozen=True)
class StepResult:
    description: str
    rows_in: int
    kept: int
    dropped: int
    added: int

    @property
    def rows_out(self) -> int:
        return self.kept + self.added

    def line(self) -> str:
        return (
            f"{self.description}: {self.rows_in} in, kept {self.kept}, dropped {self.dropped}, "
            f"added {self.added}"
        )


@dataclass
class PipelineContext:
    """What steps may need besides the rows."""

    fields: FieldMapping | None = None
    tokenizer: Any = None  # a transformers tokenizer, for token_count and max_tokens
    seed: int = 42
    cache_dir: str | None = None
    device: str = "cpu"

    def shape(self, records: Sequence[Record]) -> ExampleShape:
        return resolve_shape(self.fields, columns_of(records))

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            raise InvalidConfig("token_count and max_tokens need the base model's tokenizer")
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def run_pipeline(
    records: list[Record], steps: Sequence[PreprocessingStep], context: PipelineContext
) -> tuple[list[Record], list[StepResult]]:
    """Apply the steps in order."""
    results = []
    for index, step in enumerate(steps, start=1):
        apply = build_step(step, index)
        rows_in = len(records)
        records, result = apply(records, context)
        results.append(replace(result, rows_in=rows_in))
    return records, results


StepFunction = Callable[[list[Record], PipelineContext], tuple[list[Record], StepResult]]


def build_step(step: PreprocessingStep, index: int) -> StepFunction:
    """Check a step's settings and return the function that runs it."""
    where = f"dataset.preprocessing[{index - 1}]"
    if step.type == PreprocessingType.FILTER:
        if not step.condition:
            raise InvalidConfig(f"{where}: a filter step needs a condition")
        try:
            condition = Condition(step.condition)
        except ConditionError as err:
            raise InvalidConfig(f"{where}: {err}") from err
        return lambda records, context: filter_rows(records, context, condition)
    if step.type == PreprocessingType.TRANSFORM:
        operation = step.operation or ""
        if operation not in TRANSFORMS:
            raise InvalidConfig(
                f"{where}.operation {operation!r} is not one of {', '.join(TRANSFORMS)}"
            )
        params = dict(step.params)
        if operation == "truncate":
            _truncate_limit(params, where)
        if operation == "template":
            _template_columns(params.get("template", ""), where)
        return lambda records, context: _TRANSFORM_FUNCTIONS[operation](records, context, params)
    method = step.method or ""
    if method not in AUGMENTATIONS:
        raise InvalidConfig(f"{where}.method {method!r} is not one of {', '.join(AUGMENTATIONS)}")
    params = dict(step.params)
    if method == "noise":
        noise = NoiseSettings.from_params(params, where)
        return lambda records, context: augment_noise(records, context, noise)
    if not params.get("forward_model") or not params.get("backward_model"):
        raise InvalidConfig(
            f"{where}: back_translation needs params forward_model and backward_model "
            "(folders or Hub ids of translation models)"
        )
    fraction = _float_param(params, "fraction", 1.0, where, 0.0, 1.0)
    return lambda records, context: augment_back_translation(records, context, params, fraction)


# --- filter ------------------------------------------------------------------


def filter_rows(
    records: list[Record], context: PipelineContext, condition: Condition
) -> tuple[list[Record], StepResult]:
    shape = context.shape(records) if records else None
    kept = []
    for record in records:
        text: list[str] = []

        def lookup(name: str, record: Record = record, text: list[str] = text) -> Any:
            if name in record.fields:
                return record.fields[name]
            if name in ("length", "word_count", "token_count"):
                if not text:
                    text.append(example_text(record, shape))
                if name == "length":
                    return len(text[0])
                if name == "word_count":
                    return len(text[0].split())
                return context.count_tokens(text[0])
            raise EvaluationError(
                f"unknown field {name!r}: use length, word_count, token_count or a column "
                f"({', '.join(sorted(record.fields))})",
                name,
            )

        try:
            if condition.matches(lookup):
                kept.append(record)
        except EvaluationError as err:
            raise InvalidDataset(f"{record.where}: filter {condition.text!r}: {err}") from err
    return kept, StepResult(
        f"filter {condition.text!r}", len(records), len(kept), len(records) - len(kept), 0
    )


# --- transforms --------------------------------------------------------------


def _map_strings(
    records: list[Record],
    context: PipelineContext,
    params: dict[str, str],
    function: Callable[[str], str],
    name: str,
) -> tuple[list[Record], StepResult]:
    """Apply a string function to the example's text columns (or params.columns)."""
    if not records:
        return records, StepResult(name, 0, 0, 0, 0)
    shape = context.shape(records)
    columns = _columns_param(params) or shape.columns
    out = []
    for record in records:
        fields = dict(record.fields)
        for column in columns:
            if shape.kind == "messages" and column == shape.messages:
                fields[column] = [
                    {**m, "content": function(m["content"])} for m in messages_of(record, column)
                ]
            elif column in fields:
                fields[column] = function(string_field(record, column))
            else:
                string_field(record, column)  # raises: missing column
        out.append(replace(record, fields=fields))
    return out, StepResult(name, len(records), len(out), 0, 0)


def _columns_param(params: dict[str, str]) -> tuple[str, ...]:
    return tuple(c.strip() for c in params.get("columns", "").split(",") if c.strip())


def transform_lowercase(records, context, params):
    return _map_strings(records, context, params, str.lower, "transform lowercase")


def transform_strip(records, context, params):
    return _map_strings(records, context, params, str.strip, "transform strip")


def normalize_whitespace(text: str) -> str:
    """NFKC, runs of spaces/tabs collapsed to one space, newlines kept, ends stripped."""
    text = unicodedata.normalize("NFKC", text)
    lines = [re.sub(r"[^\S\n]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def transform_normalize_whitespace(records, context, params):
    return _map_strings(
        records, context, params, normalize_whitespace, "transform normalize_whitespace"
    )


def transform_deduplicate(records, context, params):
    """Keep the first row of each distinct example (compared on the example's columns)."""
    if not records:
        return records, StepResult("transform deduplicate", 0, 0, 0, 0)
    columns = _columns_param(params) or context.shape(records).columns
    seen: set[str] = set()
    kept = []
    for record in records:
        key = json.dumps([record.fields.get(c) for c in columns], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, StepResult(
        "transform deduplicate", len(records), len(kept), len(records) - len(kept), 0
    )


def _truncate_limit(params: dict[str, str], where: str) -> tuple[str, int]:
    keys = [k for k in ("max_chars", "max_tokens") if k in params]
    if len(keys) != 1:
        raise InvalidConfig(f"{where}: truncate needs exactly one of params max_chars, max_tokens")
    try:
        limit = int(params[keys[0]])
    except ValueError as err:
        raise InvalidConfig(f"{where}.params.{keys[0]} must be an integer") from err
    if limit <= 0:
        raise InvalidConfig(f"{where}.params.{keys[0]} must be positive")
    return keys[0], limit


def transform_truncate(records, context, params):
    """Cut the target text (text, or completion) to max_chars characters or max_tokens tokens."""
    kind, limit = _truncate_limit(params, "truncate")
    if kind == "max_chars":

        def cut(text: str) -> str:
            return text[:limit]
    else:
        tokenizer = context.tokenizer
        if tokenizer is None:
            raise InvalidConfig("truncate max_tokens needs the base model's tokenizer")

        def cut(text: str) -> str:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = encoded["offset_mapping"]
            return text if len(offsets) <= limit else text[: offsets[limit - 1][1]]

    if not records:
        return records, StepResult(f"transform truncate {kind}={limit}", 0, 0, 0, 0)
    shape = context.shape(records)
    if not _columns_param(params):
        target = {"text": shape.text, "prompt_completion": shape.completion}.get(shape.kind)
        params = {**params, "columns": target or shape.messages or ""}
    out, result = _map_strings(records, context, params, cut, f"transform truncate {kind}={limit}")
    return out, result


def _template_columns(template: str, where: str) -> list[str]:
    """The {column} placeholders of a template; format specs, conversions, attribute or
    index access are refused (templates must not reach into objects)."""
    if not template:
        raise InvalidConfig(f"{where}: template needs params.template, e.g. 'Q: {{question}}'")
    columns = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise InvalidConfig(f"{where}.params.template: {err}") from err
    for _literal, name, format_spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or format_spec or conversion:
            raise InvalidConfig(
                f"{where}.params.template: placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + format_spec if format_spec else ''}}} is not allowed; use plain "
                "{column} names (write {{ and }} for literal braces)"
            )
        columns.append(name)
    return columns


def transform_template(records, context, params):
    """Render params.template with each row's columns into params.column (default text)."""
    template = params.get("template", "")
    columns = _template_columns(template, "template")
    target = params.get("column", "text")
    out = []
    for record in records:
        values = {}
        for column in columns:
            if column not in record.fields:
                raise InvalidDataset(
                    f"{record.where}: template needs field {column!r}, which the row lacks"
                )
            value = record.fields[column]
            values[column] = value if isinstance(value, str) else json.dumps(value)
        out.append(replace(record, fields={**record.fields, target: template.format_map(values)}))
    return out, StepResult(f"transform template into {target!r}", len(records), len(out), 0, 0)


_TRANSFORM_FUNCTIONS = {
    "lowercase": transform_lowercase,
    "strip": transform_strip,
    "normalize_whitespace": transform_normalize_whitespace,
    "deduplicate": transform_deduplicate,
    "truncate": transform_truncate,
    "template": transform_template,
}


# --- augmentation ------------------------------------------------------------


def _float_param(
    params: dict[str, str], name: str, default: float, where: str, low: float, high: float
) -> float:
    try:
        value = float(params.get(name, default))
    except ValueError as err:
        raise InvalidConfig(f"{where}.params.{name} must be a number") from err
    if not low <= value <= high:
        raise InvalidConfig(f"{where}.params.{name} must be between {low} and {high}")
    return value


def _select(records: list[Record], fraction: float, rng: random.Random) -> list[Record]:
    """A seeded sample of round(fraction * n) rows, in their original order."""
    count = round(fraction * len(records))
    chosen = sorted(rng.sample(range(len(records)), count))
    return [records[i] for i in chosen]


def _augmentable(record: Record, shape: ExampleShape) -> list[str]:
    """The input texts of a row that augmentation varies (user turns for chat)."""
    if shape.kind == "messages":
        return [
            m["content"] for m in messages_of(record, shape.messages or "") if m["role"] == "user"
        ]
    return [string_field(record, column) for column in shape.input_columns]


def _with_inputs(record: Record, shape: ExampleShape, texts: list[str], origin: str) -> Record:
    fields = dict(record.fields)
    texts = list(texts)
    if shape.kind == "messages":
        column = shape.messages or ""
        fields[column] = [
            {**m, "content": texts.pop(0)} if m["role"] == "user" else m
            for m in messages_of(record, column)
        ]
    else:
        for column in shape.input_columns:
            fields[column] = texts.pop(0)
    return replace(record, fields=fields, origin=origin)


@dataclass(frozen=True)
class NoiseSettings:
    fraction: float = 0.5  # share of rows that get a noisy copy
    probability: float = 0.1  # chance of an edit at each character or word
    level: str = "char"  # char, word or both
    seed: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, str], where: str) -> NoiseSettings:
        level = params.get("level", "char")
        if level not in ("char", "word", "both"):
            raise InvalidConfig(f"{where}.params.level must be char, word or both")
        seed = params.get("seed")
        try:
            seed_value = int(seed) if seed is not None else None
        except ValueError as err:
            raise InvalidConfig(f"{where}.params.seed must be an integer") from err
        return cls(
            fraction=_float_param(params, "fraction", 0.5, where, 0.0, 1.0),
            probability=_float_param(params, "probability", 0.1, where, 0.0, 1.0),
            level=level,
            seed=seed_value,
        )


def add_noise(text: str, rng: random.Random, probability: float, level: str) -> str:
    """Drop or swap characters and/or words, each with the given probability."""

    def perturb(items: list[str]) -> list[str]:
        out: list[str] = []
        index = 0
        while index < len(items):
            roll = rng.random()
            if roll < probability / 2 and len(items) > 1:
                index += 1  # drop
                continue
            if roll < probability and index + 1 < len(items):
                out.extend([items[index + 1], items[index]])  # swap with the next one
                index += 2
                continue
            out.append(items[index])
            index += 1
        return out

    if level in ("word", "both"):
        text = " ".join(perturb(text.split(" ")))
    if level in ("char", "both"):
        text = "".join(perturb(list(text)))
    return text


def augment_noise(records, context: PipelineContext, noise: NoiseSettings):
    """Add noisy copies of a seeded sample of rows (the targets stay clean)."""
    rng = random.Random(noise.seed if noise.seed is not None else context.seed)
    if not records:
        return records, StepResult("augment noise", 0, 0, 0, 0)
    shape = context.shape(records)
    added = []
    for record in _select(records, noise.fraction, rng):
        texts = [
            add_noise(t, rng, noise.probability, noise.level) for t in _augmentable(record, shape)
        ]
        added.append(_with_inputs(record, shape, texts, "noise"))
    return records + added, StepResult(
        f"augment noise ({noise.level}, p={noise.probability})",
        len(records),
        len(records),
        0,
        len(added),
    )


class Translator:
    """A seq2seq translation model, run greedily in small batches."""

    def __init__(self, name: str, *, cache_dir: str | None, device: str) -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(name, cache_dir=cache_dir)
        except OSError as err:
            raise InputNotFound(f"translation model {name!r} cannot be loaded: {err}") from err
        self.model.to(device).eval()
        self.device = device

    def __call__(self, texts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            with torch.no_grad():
                generated = self.model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1
                )
            out.extend(self.tokenizer.batch_decode(generated, skip_special_tokens=True))
        return out


def augment_back_translation(records, context: PipelineContext, params, fraction: float):
    """Add copies of a seeded sample of rows whose inputs went to another language and back.

    Copies whose round trip comes back empty are not added (the step line counts them)."""
    if not records:
        return records, StepResult("augment back_translation", 0, 0, 0, 0)
    shape = context.shape(records)
    rng = random.Random(int(params.get("seed", context.seed)))
    chosen = _select(records, fraction, rng)
    max_new_tokens = int(params.get("max_new_tokens", "128"))
    forward = Translator(
        params["forward_model"], cache_dir=context.cache_dir, device=context.device
    )
    backward = Translator(
        params["backward_model"], cache_dir=context.cache_dir, device=context.device
    )
    inputs = [_augmentable(record, shape) for record in chosen]
    flat = [text for texts in inputs for text in texts]
    round_trip = iter(backward(forward(flat, max_new_tokens), max_new_tokens))
    added = []
    empty = 0
    for record, texts in zip(chosen, inputs, strict=True):
        translated = [next(round_trip).strip() for _ in texts]
        if not translated or any(not t for t in translated):
            empty += 1
            continue
        added.append(_with_inputs(record, shape, translated, "back_translation"))
    return records + added, StepResult(
        f"augment back_translation ({len(chosen)} rows tried, {empty} empty results)",
        len(records),
        len(records),
        0,
        len(added),
    )
