"""The examples spec.evaluation is measured on, read and checked before any GPU time.

Each example is a prompt, rendered exactly as training renders prompts, and a
reference completion: prompt/completion rows as they are, chat rows with the
last assistant turn as the reference and the conversation before it as the
prompt (through the chat template, with the generation prompt). The
validation pod builds this set too, so a missing file, a wrong column or a bad
regular expression fails the job before GPUs are requested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.evaluation import (
    GENERATION_METRICS,
    EvaluationDataFormat,
    EvaluationMetric,
    EvaluationSpec,
)
from kubetune.api.finetuningjob import DatasetFormat
from kubetune.api.trainer import TrainerConfig
from kubetune_trainer import scoring
from kubetune_trainer.data import records_digest
from kubetune_trainer.encoding import Encoder, Example
from kubetune_trainer.errors import InputNotFound, InvalidConfig, InvalidDataset
from kubetune_trainer.records import (
    ExampleShape,
    Record,
    check_example,
    columns_of,
    messages_of,
    resolve_shape,
    string_field,
)
from kubetune_trainer.sources import read_file_records, read_huggingface_records


@dataclass(frozen=True)
class EvaluationExample:
    prompt: str  # as shown in the report
    prompt_ids: list[int]  # what generation starts from
    reference: str | None  # None for text rows: teacher-forced metrics only
    example: Example  # prompt + reference with labels, for loss and token accuracy


@dataclass(frozen=True)
class EvaluationSet:
    examples: list[EvaluationExample]
    digest: str  # sha256:<hex> of the rows evaluated
    pattern: re.Pattern | None
    schema: dict | None
    metrics: list[EvaluationMetric]


def load_evaluation_set(
    config: TrainerConfig,
    tokenizer,
    validation_records: list[Record],
    training_shape: ExampleShape,
) -> EvaluationSet | None:
    """The evaluation set of spec.evaluation (None without one); problems raise errors
    that name the field."""
    spec = config.spec.evaluation
    if spec is None:
        return None
    pattern, schema = _checked_formats(spec)
    records, shape = _records(config, spec, validation_records, training_shape)
    records = records[: spec.max_examples]
    if not records:
        raise InvalidDataset(
            "spec.evaluation has no examples: the validation split is empty (raise "
            "dataset.validationSplit) or evaluation.data holds no rows"
        )
    generation = [m for m in spec.metrics if m in GENERATION_METRICS]
    if generation and shape.kind == "text":
        raise InvalidConfig(
            f"spec.evaluation.metrics: {', '.join(m.value for m in generation)} compare "
            "generated text to a reference, and the evaluation rows are plain text: use "
            "prompt/completion or chat rows, or only loss, perplexity and token_accuracy"
        )
    encoder = Encoder(tokenizer, shape, config.hyperparameters.max_seq_length)
    examples = []
    for record in records:
        check_example(record, shape)
        encoded, _ = encoder.encode(record)
        prompt, prompt_ids, reference = _prompt_and_reference(record, shape, encoder)
        examples.append(EvaluationExample(prompt, prompt_ids, reference, encoded))
    return EvaluationSet(
        examples=examples,
        digest="sha256:" + records_digest(records),
        pattern=pattern,
        schema=schema,
        metrics=list(spec.metrics),
    )


def _checked_formats(spec: EvaluationSpec) -> tuple[re.Pattern | None, dict | None]:
    pattern = schema = None
    if spec.regex is not None:
        problem = scoring.check_regex(spec.regex)
        if problem:
            raise InvalidConfig(f"spec.evaluation.regex: {problem}")
        pattern = re.compile(spec.regex)
    if spec.json_schema is not None:
        problem = scoring.check_schema(spec.json_schema)
        if problem:
            raise InvalidConfig(f"spec.evaluation.jsonSchema: {problem}")
        schema = spec.json_schema
    return pattern, schema


def _records(
    config: TrainerConfig,
    spec: EvaluationSpec,
    validation_records: list[Record],
    training_shape: ExampleShape,
) -> tuple[list[Record], ExampleShape]:
    data = spec.data
    if data is None:
        return validation_records, training_shape
    if data.format == EvaluationDataFormat.HUGGINGFACE:
        assert data.hugging_face is not None  # admission requires it
        records = read_huggingface_records(
            data.hugging_face, local_path=None, cache_dir=config.paths.cache
        )
    else:
        path = config.paths.evaluation
        if not path or not Path(path).exists():
            raise InputNotFound(f"spec.evaluation.data: the file {path} does not exist")
        records = read_file_records(path, DatasetFormat(data.format.value))
    fields = data.fields or config.spec.dataset.fields
    return records, resolve_shape(fields, columns_of(records))


def _prompt_and_reference(
    record: Record, shape: ExampleShape, encoder: Encoder
) -> tuple[str, list[int], str | None]:
    if shape.kind == "prompt_completion":
        prompt = string_field(record, shape.prompt or "")
        return prompt, encoder.prompt_ids(prompt), string_field(record, shape.completion or "")
    if shape.kind == "messages":
        messages = messages_of(record, shape.messages or "")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids = encoder.chat_prompt_ids(messages[:last])
        return messages[last - 1]["content"] if last else "", ids, messages[last]["content"]
    text = string_field(record, shape.text or "")
    return text, [], None
