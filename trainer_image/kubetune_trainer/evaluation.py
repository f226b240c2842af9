"""spec.evaluation after training: the saved model, and the base model, on the evaluation set.

Runs in the main process once the model is saved, on models loaded from disk
(the base as training loaded it, the tuned one from the artifact just
written), so it is the same for one process or many, sharded or not, and it
checks the artifact that will be registered. Loss and token accuracy are taken
on the reference completions with one forward pass per batch; the generation
metrics on outputs decoded from each prompt (greedy unless a temperature is
set). Per-example rows go to a JSON Lines report next to the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from kubetune.api.evaluation import (
    GENERATION_METRICS,
    EvaluationMetric,
    EvaluationResult,
    GenerationSettings,
    MetricResult,
)
from kubetune.api.finetuningjob import FineTuningMethod, ResolvedHyperparameters
from kubetune.api.trainer import TrainerConfig
from kubetune_trainer import modeling, scoring
from kubetune_trainer.encoding import IGNORE_INDEX
from kubetune_trainer.evaluation_set import EvaluationSet
from kubetune_trainer.reporting import now

log = logging.getLogger(__name__)

REPORT_FILE = "evaluation.jsonl"
TEACHER_FORCED_BATCH = 8


@dataclasses.dataclass
class ModelScores:
    outputs: list[str | None]  # generated text per example (None: not generated)
    rows: list[dict[str, float]]  # scores per example
    totals: dict[str, float]  # each metric over the set


def evaluate_models(
    config: TrainerConfig,
    hp: ResolvedHyperparameters,
    source: modeling.ModelSource,
    tokenizer,
    device: torch.device,
    model_dir: Path,
    output: Path,
    evaluation_set: EvaluationSet,
) -> EvaluationResult:
    """Base (when asked) and tuned model on the evaluation set; writes the report file."""
    spec = config.spec
    settings = spec.evaluation
    assert settings is not None
    base = modeling.load_base_model(source, spec, hp, device)
    base_scores = None
    if settings.compare_base:
        log.info("evaluation: base model on %d examples", len(evaluation_set.examples))
        base_scores = score_model(base, tokenizer, evaluation_set, settings.generation, hp.seed)
    tuned = _tuned_model(base, config, hp, source, device, model_dir)
    log.info("evaluation: fine-tuned model on %d examples", len(evaluation_set.examples))
    tuned_scores = score_model(tuned, tokenizer, evaluation_set, settings.generation, hp.seed)
    write_report(output / REPORT_FILE, evaluation_set, base_scores, tuned_scores)
    metrics = {
        metric.value: MetricResult(
            tuned=tuned_scores.totals[metric.value],
            base=base_scores.totals.get(metric.value) if base_scores else None,
        )
        for metric in evaluation_set.metrics
        if metric.value in tuned_scores.totals
    }
    return EvaluationResult(
        examples=len(evaluation_set.examples),
        dataset_digest=evaluation_set.digest,
        metrics=metrics,
        evaluated_at=now(),
    )


def _tuned_model(base, config, hp, source, device, model_dir: Path):
    if config.spec.method == FineTuningMethod.FULL:
        del base
        saved = dataclasses.replace(source, name_or_path=str(model_dir), revision=None, token=None)
        return modeling.load_base_model(saved, config.spec, hp, device, quantized=False)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(model_dir))


@torch.no_grad()
def score_model(
    model, tokenizer, evaluation_set: EvaluationSet, generation: GenerationSettings, seed: int
) -> ModelScores:
    model.eval()
    examples = evaluation_set.examples
    rows: list[dict[str, float]] = [{} for _ in examples]
    totals: dict[str, float] = {}
    wanted = set(evaluation_set.metrics)
    if wanted & {
        EvaluationMetric.LOSS,
        EvaluationMetric.PERPLEXITY,
        EvaluationMetric.TOKEN_ACCURACY,
    }:
        loss, accuracy = _teacher_forced(model, tokenizer, [e.example for e in examples], rows)
        for metric, value in (
            (EvaluationMetric.LOSS, loss),
            (EvaluationMetric.PERPLEXITY, scoring.perplexity(loss)),
            (EvaluationMetric.TOKEN_ACCURACY, accuracy),
        ):
            if metric in wanted:
                totals[metric.value] = value
    outputs: list[str | None] = [None] * len(examples)
    generated = [m.value for m in evaluation_set.metrics if m in GENERATION_METRICS]
    if generated:
        torch.manual_seed(seed)  # sampling, when a temperature is set, repeats per run
        with_prompt = [i for i, e in enumerate(examples) if e.prompt_ids]
        texts = _generate(
            model, tokenizer, [examples[i].prompt_ids for i in with_prompt], generation
        )
        for index, text in zip(with_prompt, texts, strict=True):
            outputs[index] = text
            rows[index].update(
                scoring.score_example(
                    generated,
                    text,
                    examples[index].reference,
                    pattern=evaluation_set.pattern,
                    schema=evaluation_set.schema,
                )
            )
        totals.update({k: v for k, v in scoring.aggregate(rows).items() if k in generated})
    return ModelScores(outputs, rows, totals)


@torch.no_grad()
def _teacher_forced(model, tokenizer, examples, rows) -> tuple[float, float]:
    """Mean loss per label token and the share of label tokens predicted exactly (argmax),
    over the whole set; each row gets its own loss and accuracy."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_sum, correct_sum, count_sum = 0.0, 0, 0
    for start in range(0, len(examples), TEACHER_FORCED_BATCH):
        batch = examples[start : start + TEACHER_FORCED_BATCH]
        width = max(len(e) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            ids[row, : len(example)] = torch.tensor(example.input_ids)
            labels[row, : len(example)] = torch.tensor(example.labels)
            mask[row, : len(example)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        # Prompt tuning prepends virtual positions to the logits: the last `width` are ours.
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:, :].float()
        predicted, target = logits[:, :-1, :], labels[:, 1:]
        valid = target != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(
            predicted.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
        )
        hits = (predicted.argmax(-1) == target) & valid
        for row in range(len(batch)):
            count = int(valid[row].sum())
            if count == 0:
                continue
            row_loss = float(losses[row][valid[row]].sum())
            row_hits = int(hits[row].sum())
            rows[start + row].update({"loss": row_loss / count, "token_accuracy": row_hits / count})
            loss_sum, correct_sum, count_sum = (
                loss_sum + row_loss,
                correct_sum + row_hits,
                count_sum + count,
            )
    if count_sum == 0:
        return math.nan, math.nan
    return loss_sum / count_sum, correct_sum / count_sum


def _generate(
    model, tokenizer, prompts: Sequence[list[int]], settings: GenerationSettings
) -> list[str]:
    """Decoded continuations of each prompt (left-padded batches, stopping at EOS)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = settings.temperature > 0
    texts: list[str] = []
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start : start + settings.batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        for row in out[:, width:]:
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def write_report(
    path: Path,
    evaluation_set: EvaluationSet,
    base: ModelScores | None,
    tuned: ModelScores,
) -> None:
    """One JSON object per example: prompt, reference, each model's output and scores."""
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8") as out:
        for index, example in enumerate(evaluation_set.examples):
            row = {
                "index": index,
                "prompt": example.prompt,
                "reference": example.reference,
                "base_output": base.outputs[index] if base else None,
                "tuned_output": tuned.outputs[index],
                "base_scores": base.rows[index] if base else None,
                "tuned_scores": tuned.rows[index],
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)
