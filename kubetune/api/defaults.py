"""What "auto" means: the hyperparameters a FineTuningJob actually trains with.

One pure function shared by the operator (which reports the result in
status.hyperparameters and hands it to the trainer) and local runs.
"""

from __future__ import annotations

import math
import re

from kubetune.api.common import AUTO
from kubetune.api.finetuningjob import (
    FineTuningJobSpec,
    FineTuningMethod,
    Precision,
    ResolvedHyperparameters,
)

AUTO_EPOCHS = 3
TARGET_EFFECTIVE_BATCH = 16
MAX_AUTO_BATCH = 64
UNKNOWN_GPU_MEMORY_GIB = 16

LEARNING_RATES = {
    FineTuningMethod.FULL: 2e-5,
    FineTuningMethod.LORA: 2e-4,
    FineTuningMethod.QLORA: 2e-4,
    FineTuningMethod.PREFIX_TUNING: 1e-2,
    FineTuningMethod.PROMPT_TUNING: 1e-2,
}

# Training tokens per GiB of GPU memory that fit comfortably, by method: full
# fine-tuning holds gradients and optimizer state for every weight.
TOKENS_PER_GIB = {
    FineTuningMethod.FULL: 128,
    FineTuningMethod.LORA: 512,
    FineTuningMethod.QLORA: 1024,
    FineTuningMethod.PREFIX_TUNING: 512,
    FineTuningMethod.PROMPT_TUNING: 512,
}

# GPU memory by nvidia.com/gpu.product, most specific pattern first.
_GPU_MEMORY_GIB = [
    (r"H200", 141),
    (r"(80GB|H100|H800|GH200)", 80),
    (r"L40", 48),
    (r"(40GB|A100)", 40),
    (r"(A10G?|L4|A30|3090|4090)\b", 24),
    (r"V100.*32GB", 32),
    (r"(T4|V100)", 16),
]
_NO_BF16 = re.compile(r"(T4|V100|P100|P4)\b")


def gpu_memory_gib(gpu_type: str | None) -> int:
    """GPU memory for a product name (as in the nvidia.com/gpu.product label)."""
    for pattern, gib in _GPU_MEMORY_GIB:
        if gpu_type and re.search(pattern, gpu_type):
            return gib
    return UNKNOWN_GPU_MEMORY_GIB


def _pow2_floor(n: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(n, 1))))


def resolve_hyperparameters(spec: FineTuningJobSpec) -> ResolvedHyperparameters:
    """Every "auto" in the spec replaced by a concrete value."""
    hp = spec.hyperparameters
    gpus = spec.resources.gpus
    if hp.batch_size == AUTO:
        if gpus == 0:
            batch_size = 2
        else:
            budget = gpu_memory_gib(spec.resources.gpu_type) * TOKENS_PER_GIB[spec.method]
            batch_size = min(MAX_AUTO_BATCH, _pow2_floor(budget / hp.max_seq_length))
    else:
        batch_size = hp.batch_size
    if hp.gradient_accumulation_steps == AUTO:
        per_step = batch_size * max(gpus, 1)
        accumulation = max(1, math.ceil(TARGET_EFFECTIVE_BATCH / per_step))
    else:
        accumulation = hp.gradient_accumulation_steps
    if hp.precision == Precision.AUTO:
        if gpus == 0:
            precision = Precision.FP32
        elif spec.resources.gpu_type and _NO_BF16.search(spec.resources.gpu_type):
            precision = Precision.FP16
        else:
            precision = Precision.BF16
    else:
        precision = hp.precision
    return ResolvedHyperparameters(
        epochs=AUTO_EPOCHS if hp.epochs == AUTO else hp.epochs,
        max_steps=hp.max_steps,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=batch_size * accumulation * max(gpus, 1),
        learning_rate=hp.learning_rate
        if hp.learning_rate is not None
        else LEARNING_RATES[spec.method],
        lr_scheduler=hp.lr_scheduler,
        warmup_ratio=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        max_seq_length=hp.max_seq_length,
        packing=hp.packing,
        precision=precision,
        gradient_checkpointing=hp.gradient_checkpointing,
        eval_steps=hp.eval_steps,
        save_steps=hp.save_steps,
        logging_steps=hp.logging_steps,
        seed=spec.seed,
    )
