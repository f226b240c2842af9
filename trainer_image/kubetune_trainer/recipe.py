"""The training recipe, top to bottom: setup, data, model, train, save.

`run()` returns the TrainerTermination to publish; failures are raised as
TrainerFailure (see errors.py) and turned into exit codes by `main`.
"""

from __future__ import annotations

import gc
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kubetune.api.finetuningjob import FineTuningMethod
from kubetune.api.trainer import (
    ProgressReport,
    ResultArtifact,
    ResultReport,
    TrainerConfig,
    TrainerMode,
    TrainerTermination,
)
from kubetune_trainer import export, modeling
from kubetune_trainer.preparation import prepare_dataset
from kubetune_trainer.reporting import Reporter, now
from kubetune_trainer.training import StepCallback, StepReport, Trainer

log = logging.getLogger(__name__)

MODEL_DIR = "model"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoints"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(
    config: TrainerConfig, mode: TrainerMode, *, callbacks: Sequence[StepCallback] = ()
) -> TrainerTermination:
    # --- setup ---------------------------------------------------------------
    spec, hp = config.spec, config.hyperparameters
    output = Path(config.paths.output)
    output.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(config.report, config.job.namespace)
    device = modeling.pick_device()
    autocast_dtype = modeling.autocast_dtype(hp.precision, device)
    seed_everything(hp.seed)
    source = modeling.ModelSource.from_config(config)
    tokenizer = modeling.load_tokenizer(source)

    # --- data ----------------------------------------------------------------
    data = prepare_dataset(config, tokenizer, device=device.type)
    reporter.validation(data.report)
    for line in data.report.steps:
        log.info("dataset: %s", line)
    if mode == TrainerMode.VALIDATE:
        return TrainerTermination(validation=data.report)
    export.write_json(output / "trainer_config.json", config.model_dump(mode="json", by_alias=True))

    # --- model ---------------------------------------------------------------
    seed_everything(hp.seed)
    model = modeling.load_base_model(source, spec, hp.precision, device)
    model = modeling.apply_method(model, spec, source, hp.gradient_checkpointing)
    packed = (
        hp.packing
        and spec.method not in modeling.VIRTUAL_TOKEN_METHODS
        and modeling.packing_supported(model, device)
    )
    log.info("batches: %s", "packed, padding-free" if packed else "padded, length-grouped")

    # --- train ---------------------------------------------------------------
    def report_progress(step: StepReport) -> None:
        if step.step % hp.logging_steps and step.step != step.total_steps:
            return
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
            ),
            final=step.step == step.total_steps,
        )
        log.info(
            "step %d/%d loss %.4f lr %.3g %.0f tokens/s",
            step.step,
            step.total_steps,
            step.loss,
            step.learning_rate,
            step.tokens_per_second,
        )

    trainer = Trainer(
        model=model,
        train_examples=data.train.examples,
        eval_examples=data.eval.examples,
        hyperparameters=hp,
        packed=packed,
        pad_token_id=tokenizer.pad_token_id,
        device=device,
        autocast_dtype=autocast_dtype,
        checkpoint_dir=output / CHECKPOINT_DIR,
        virtual_tokens=modeling.num_virtual_tokens(model),
        callbacks=[report_progress, *callbacks],
    )
    trainer.resume()
    started = time.monotonic()
    state = trainer.fit()
    runtime = time.monotonic() - started

    # --- save ----------------------------------------------------------------
    metrics = {
        "train_loss": state.loss_history[-1][1] if state.loss_history else float("nan"),
        "steps": float(state.step),
        "epochs": state.step / max(trainer.steps_per_epoch, 1),
        "train_tokens": float(state.real_tokens),
        "train_runtime_seconds": runtime,
    }
    if data.eval.examples:
        metrics["eval_loss_initial"] = state.eval_history[0][1]
        eval_loss = trainer.evaluate()
        metrics["eval_loss"] = eval_loss
        metrics["eval_perplexity"] = math.exp(min(eval_loss, 50.0))
    model_dir = output / MODEL_DIR
    export.save_model(model, tokenizer, model_dir)
    digest = export.weights_digest(model_dir)
    export.write_model_card(config, model_dir, metrics, digest, data.report.digest)
    export.write_json(
        output / "metrics.json",
        {**metrics, "loss_history": state.loss_history, "eval_history": state.eval_history},
    )
    merged_path = None
    if spec.output.merge_adapter and spec.method in (FineTuningMethod.LORA, FineTuningMethod.QLORA):
        del trainer, model
        gc.collect()
        merged_path = MERGED_DIR
        save_merged(config, source, tokenizer, device, model_dir, output / MERGED_DIR)

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
    )
    reporter.result(result)
    return TrainerTermination(result=result)


def save_merged(config, source, tokenizer, device, adapter_dir: Path, merged_dir: Path) -> None:
    """The base with the adapter merged in. QLoRA merges into the dequantised 4-bit base
    (the weights it trained against), in the compute dtype, never into 4-bit weights."""
    spec, hp = config.spec, config.hyperparameters
    if spec.method == FineTuningMethod.QLORA:
        base = modeling.load_base_model(source, spec, hp.precision, device, quantized=True)
        dtype = modeling.DTYPES[
            (spec.quantization or modeling.QuantizationSettings()).compute_dtype
        ]
        export.dequantize_linear4bit(base, dtype)
    else:
        base = modeling.load_base_model(source, spec, hp.precision, device, quantized=False)
    export.merge_adapter(base, adapter_dir, tokenizer, merged_dir)
