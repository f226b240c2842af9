"""The training recipe, top to bottom: setup, data, model, trainer, train, save, evaluate.

`run()` returns the TrainerTermination to publish; failures are raised as
TrainerFailure (see errors.py) and turned into exit codes by `main`. Under
torchrun every process runs this; only the main one reports and writes the
model.
"""

from __future__ import annotations

import gc
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kubetune.api.evaluation import EvaluationResult
from kubetune.api.finetuningjob import (
    DistributedStrategy,
    FineTuningMethod,
    ResolvedHyperparameters,
)
from kubetune.api.trainer import (
    ProgressReport,
    ReportTarget,
    ResultArtifact,
    ResultReport,
    TrainerConfig,
    TrainerMode,
    TrainerTermination,
)
from kubetune_trainer import acceleration, export, modeling, scoring, setup
from kubetune_trainer.callbacks import CheckpointMarker, Progress, StepObserver, StopOnSignal
from kubetune_trainer.checkpoints import resumable_checkpoint
from kubetune_trainer.distributed import Processes, device_for, enable_fsdp_on_cpu, fsdp_settings
from kubetune_trainer.errors import Interrupted
from kubetune_trainer.evaluation import REPORT_FILE, evaluate_models
from kubetune_trainer.evaluation_set import load_evaluation_set
from kubetune_trainer.preparation import prepare_dataset
from kubetune_trainer.reporting import Reporter, keep_log, now
from kubetune_trainer.training import build_trainer, sft_arguments

log = logging.getLogger(__name__)

MODEL_DIR = "model"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoints"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(
    config: TrainerConfig, mode: TrainerMode, *, callbacks: Sequence[StepObserver] = ()
) -> TrainerTermination:
    # --- setup ---------------------------------------------------------------
    spec = config.spec
    processes = Processes.from_environment()
    reporter = Reporter(
        config.report if processes.is_main else ReportTarget(),
        config.job.namespace,
        config.job.name,
    )
    device = device_for(processes)
    seed_everything(config.hyperparameters.seed)
    source = modeling.ModelSource.from_config(config)
    tokenizer = modeling.load_tokenizer(source)

    # --- data ----------------------------------------------------------------
    data = prepare_dataset(config, tokenizer, device=device.type)
    # Read and checked in the validation pod too: a bad evaluation set costs no GPU time.
    evaluation_set = load_evaluation_set(config, tokenizer, data.eval_records, data.shape)
    reporter.validation(data.report)
    if mode == TrainerMode.TRAIN and processes.is_main:
        keep_log(Path(config.paths.output))  # the validation pod's output is read-only
    for line in data.report.steps:
        log.info("dataset: %s", line)
    if mode == TrainerMode.VALIDATE:
        return TrainerTermination(validation=data.report)
    output = Path(config.paths.output)
    if processes.is_main:
        output.mkdir(parents=True, exist_ok=True)
        export.write_json(
            output / "trainer_config.json", config.model_dump(mode="json", by_alias=True)
        )

    # --- model ---------------------------------------------------------------
    hardware = acceleration.Hardware.detect()
    hp = setup.before_loading(config, hardware, modeling.hidden_size(source))
    modeling.check_precision(hp.precision, device)
    seed_everything(hp.seed)
    model = modeling.load_base_model(source, spec, hp, device)
    hp = setup.after_loading(spec, hp, model, device)
    model = modeling.apply_method(model, spec, source)
    hp = setup.choose_packing(spec, hp, model, device, [len(e) for e in data.train.examples])
    for decision in hp.decisions:
        log.info("auto: %s", decision)

    # --- trainer -------------------------------------------------------------
    def report_progress(step) -> None:
        reporter.progress(
            ProgressReport(
                step=step.step,
                total_steps=step.total_steps,
                epoch=step.epoch,
                loss=step.loss,
                eval_loss=step.eval_loss,
                learning_rate=step.learning_rate,
                tokens_per_second=step.tokens_per_second,
                eta_seconds=step.eta_seconds,
                timestamp=now(),
                hyperparameters=hp,
            ),
            final=step.step == step.total_steps,
        )
        log.info(
            "step %d/%d loss %s lr %s %s tokens/s",
            step.step,
            step.total_steps,
            _fmt(step.loss),
            _fmt(step.learning_rate),
            _fmt(step.tokens_per_second),
        )

    progress = Progress([report_progress, *callbacks], processes)
    stop = StopOnSignal(processes)
    checkpoints = output / CHECKPOINT_DIR
    resume = resumable_checkpoint(checkpoints, config.job)
    args = sft_arguments(
        hp,
        output_dir=checkpoints,
        on_cpu=device.type == "cpu",
        has_eval=bool(data.eval.examples),
        collective_timeout_seconds=spec.distributed.timeout_seconds,
        fsdp=fsdp_settings(model, hp),
        evaluate_first=resume is None,
    )
    trainer = build_trainer(
        model,
        tokenizer,
        args,
        train=data.train.examples,
        evaluation=data.eval.examples,
        callbacks=[progress, CheckpointMarker(config.job, processes), stop],
        keep_fp32_adapters=hp.precision.value != "bf16",
    )
    if hp.distributed_strategy == DistributedStrategy.FSDP and device.type == "cpu":
        enable_fsdp_on_cpu(trainer)

    # --- train ---------------------------------------------------------------
    if resume is not None:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.stopped:
        raise Interrupted(trainer.state.global_step)

    # --- save and evaluate ---------------------------------------------------
    metrics = _metrics(trainer, progress, data)
    model_dir = output / MODEL_DIR
    export.save_trained(trainer, tokenizer, model_dir, processes)
    if not processes.is_main:
        return TrainerTermination()
    digest = export.weights_digest(model_dir)
    export.write_json(
        output / "metrics.json",
        {
            **metrics,
            "loss_history": logged(trainer.state.log_history, "loss"),
            "eval_history": logged(trainer.state.log_history, "eval_loss"),
        },
    )
    del trainer, model  # what follows loads models from disk
    free_memory()
    evaluation = None
    if evaluation_set is not None:
        evaluation = evaluate_safely(
            config, hp, source, tokenizer, device, model_dir, output, evaluation_set
        )
    export.write_model_card(config, hp, model_dir, metrics, digest, data.report.digest, evaluation)
    merged_path = None
    if spec.output.merge_adapter and spec.method in (FineTuningMethod.LORA, FineTuningMethod.QLORA):
        merged_path = MERGED_DIR
        save_merged(config, hp, source, tokenizer, device, model_dir, output / MERGED_DIR)

    result = ResultReport(
        artifact=ResultArtifact(
            path=MODEL_DIR,
            kind=export.artifact_kind(spec.method),
            digest=digest,
            merged_path=merged_path,
        ),
        metrics=metrics,
        dataset_digest=data.report.digest,
        completed_at=now(),
        hyperparameters=hp,
        evaluation=evaluation,
        evaluation_report_path=REPORT_FILE if evaluation and not evaluation.error else None,
    )
    reporter.result(result)
    return TrainerTermination(result=result)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_safely(config, hp, source, tokenizer, device, model_dir, output, evaluation_set):
    """spec.evaluation, whose failure never costs the trained model: it is saved already,
    and an error becomes the result's message (the operator's Evaluated condition)."""
    try:
        return evaluate_models(
            config, hp, source, tokenizer, device, model_dir, output, evaluation_set
        )
    except Exception as err:
        log.exception("evaluation failed; the trained model is kept")
        message = f"evaluation failed after training ({type(err).__name__}: {err}); the model "
        return EvaluationResult(
            examples=len(evaluation_set.examples),
            dataset_digest=evaluation_set.digest,
            error=(message + "was saved and registered")[:4000],
        )
    finally:
        free_memory()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _metrics(trainer, progress: Progress, data) -> dict[str, float]:
    state = trainer.state
    metrics = {
        "train_loss": mean_logged_loss(state.log_history),
        "steps": float(state.global_step),
        "epochs": float(state.epoch or 0.0),
        "train_tokens": float((state.epoch or 0.0) * data.train.tokens),
        "train_runtime_seconds": progress.clock.step_seconds,
    }
    if progress.clock.tokens_per_second:
        metrics["train_tokens_per_second"] = progress.clock.tokens_per_second
    if trainer.eval_dataset is not None:
        evals = logged(state.log_history, "eval_loss")
        last = evals[-1] if evals else None
        eval_loss = (
            last[1] if last and last[0] == state.global_step else trainer.evaluate()["eval_loss"]
        )
        if evals and evals[0][0] == 0:  # evaluated on start, by this run or the one resumed
            metrics["eval_loss_initial"] = float(evals[0][1])
        metrics["eval_loss"] = float(eval_loss)
        metrics["eval_perplexity"] = scoring.perplexity(eval_loss)
    return metrics


def logged(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value, resumed runs included (the Trainer's state
    comes back with the checkpoint)."""
    return [
        (entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry
    ]


def mean_logged_loss(log_history: list[dict]) -> float:
    """The mean loss over every step: each logged loss is the mean since the previous log,
    so each counts for the steps it covers (resumed runs included)."""
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        covered = entry["step"] - previous
        if covered > 0:
            total += entry["loss"] * covered
            steps += covered
            previous = entry["step"]
    return total / steps if steps else float("nan")


def save_merged(
    config: TrainerConfig,
    hp: ResolvedHyperparameters,
    source,
    tokenizer,
    device,
    adapter_dir: Path,
    merged_dir: Path,
) -> None:
    """The base with the adapter merged in. QLoRA merges into the dequantised 4- or 8-bit
    base (the weights it trained against), never into quantised weights."""
    base = modeling.load_base_model(source, config.spec, hp, device)
    if config.spec.method == FineTuningMethod.QLORA:
        base = export.dequantize(base)
    export.merge_adapter(base, adapter_dir, tokenizer, merged_dir)
