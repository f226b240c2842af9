"""The dataset made ready for training, with every check done before GPU time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubetune.api.finetuningjob import PreprocessingStep, PreprocessingType
from kubetune.api.trainer import TrainerConfig, ValidationReport
from kubetune_trainer.data import load_records, records_digest, split_records
from kubetune_trainer.encoding import EncodedSplit, Encoder
from kubetune_trainer.errors import InvalidDataset
from kubetune_trainer.preprocessing import PipelineContext, run_pipeline
from kubetune_trainer.records import (
    ExampleShape,
    Record,
    check_example,
    columns_of,
    resolve_shape,
)
from kubetune_trainer.sources import TextMode


@dataclass(frozen=True)
class PreparedDataset:
    train: EncodedSplit
    eval: EncodedSplit
    report: ValidationReport
    eval_records: list[Record]  # the validation split's rows, as spec.evaluation reads them
    shape: ExampleShape


def preprocess_and_split(
    records: list[Record],
    steps: Sequence[PreprocessingStep],
    context: PipelineContext,
    validation_split: float,
    seed: int,
) -> tuple[list[Record], list[Record], list[str]]:
    """Training and evaluation rows, and one report line per step.

    Augmented copies of a row must never land on the other side of the split, or the
    evaluation would score rows the model trained on: the steps before the first
    augmentation run on every row, then the rows are split, and the remaining steps
    run on each split, augmenting the training rows only."""
    steps = list(steps)
    first_augment = next(
        (i for i, step in enumerate(steps) if step.type == PreprocessingType.AUGMENT), len(steps)
    )
    records, results = run_pipeline(records, steps[:first_augment], context)
    lines = [result.line() for result in results]
    train, evaluation = split_records(records, validation_split, seed)
    if first_augment < len(steps):
        train, train_results = run_pipeline(train, steps[first_augment:], context)
        eval_steps = [s for s in steps[first_augment:] if s.type != PreprocessingType.AUGMENT]
        evaluation, _ = run_pipeline(evaluation, eval_steps, context)
        lines += [f"{result.line()} (training rows)" for result in train_results]
    return train, evaluation, lines


def prepare_dataset(
    config: TrainerConfig, tokenizer, *, device: str = "cpu", text_mode: TextMode = "auto"
) -> PreparedDataset:
    """Read, preprocess, check, split and tokenize; any problem is an error naming the row."""
    dataset = config.spec.dataset
    hp = config.hyperparameters
    records = load_records(
        dataset, local_path=config.paths.dataset, cache_dir=config.paths.cache, text_mode=text_mode
    )
    rows_read = len(records)
    if not records:
        raise InvalidDataset("the dataset has no rows")
    context = PipelineContext(
        fields=dataset.fields,
        tokenizer=tokenizer,
        seed=hp.seed,
        cache_dir=config.paths.cache,
        device=device,
    )
    train_records, eval_records, lines = preprocess_and_split(
        records, dataset.preprocessing, context, dataset.validation_split, hp.seed
    )
    records = train_records + eval_records
    if not train_records:
        raise InvalidDataset(
            f"no rows left after preprocessing ({rows_read} read): "
            + "; ".join(lines)
            + ". Loosen the filters."
        )
    shape = resolve_shape(dataset.fields, columns_of(records))
    for record in records:
        check_example(record, shape)
    encoder = Encoder(tokenizer, shape, hp.max_seq_length)
    train = encoder.encode_all(train_records)
    evaluation = encoder.encode_all(eval_records)
    lines.append(f"examples: {shape.describe()}")
    truncated = train.truncated + evaluation.truncated
    lines.append(
        f"truncated to maxSeqLength {hp.max_seq_length}: {truncated} of {len(records)} rows"
    )
    report = ValidationReport(
        rows_read=rows_read,
        rows_kept=len(records),
        train_rows=len(train.examples),
        eval_rows=len(evaluation.examples),
        tokens=train.tokens,
        digest="sha256:" + records_digest(train_records, eval_records),
        steps=lines,
    )
    return PreparedDataset(
        train=train, eval=evaluation, report=report, eval_records=eval_records, shape=shape
    )
