"""The dataset made ready for training, with every check done before GPU time."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api.trainer import TrainerConfig, ValidationReport
from kubetune_trainer.data import load_records, records_digest, split_records
from kubetune_trainer.encoding import EncodedSplit, Encoder
from kubetune_trainer.errors import InvalidDataset
from kubetune_trainer.preprocessing import PipelineContext, run_pipeline
from kubetune_trainer.records import check_example, columns_of, resolve_shape
from kubetune_trainer.sources import TextMode


@dataclass(frozen=True)
class PreparedDataset:
    train: EncodedSplit
    eval: EncodedSplit
    report: ValidationReport


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
    records, step_results = run_pipeline(records, dataset.preprocessing, context)
    lines = [result.line() for result in step_results]
    if not records:
        raise InvalidDataset(
            f"no rows left after preprocessing ({rows_read} read): "
            + "; ".join(lines)
            + ". Loosen the filters."
        )
    shape = resolve_shape(dataset.fields, columns_of(records))
    for record in records:
        check_example(record, shape)
    train_records, eval_records = split_records(records, dataset.validation_split, hp.seed)
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
    return PreparedDataset(train=train, eval=evaluation, report=report)
