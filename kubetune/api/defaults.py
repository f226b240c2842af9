"""What "auto" means: the hyperparameters a FineTuningJob actually trains with.

One pure function shared by the operator (which reports the result in
status.hyperparameters and hands it to the trainer), local runs, and the
trainer itself, which resolves again with the real model shape and device
memory (`model=` and `memory_bytes=`) and reports what it used. The rules are
written out in docs/auto.md; `decisions` in the result says which fired.
"""

from __future__ import annotations

import math
import re

from kubetune.api.common import AUTO
from kubetune.api.finetuningjob import (
    DistributedStrategy,
    FineTuningJobSpec,
    FineTuningMethod,
    Precision,
    ResolvedHyperparameters,
)
from kubetune.api.sizing import GIB, Fit, ModelShape, Workload, fit_batch, shape_from_name

AUTO_EPOCHS = 3
TARGET_EFFECTIVE_BATCH = 16
MAX_AUTO_BATCH = 64
MAX_AUTO_BATCH_CPU = 8  # CPUs gain nothing per token from larger micro-batches
UNKNOWN_GPU_MEMORY_GIB = 16

LEARNING_RATES = {
    FineTuningMethod.FULL: 2e-5,
    FineTuningMethod.LORA: 2e-4,
    FineTuningMethod.QLORA: 2e-4,
    FineTuningMethod.PREFIX_TUNING: 1e-2,
    FineTuningMethod.PROMPT_TUNING: 1e-2,
}

# GPU memory by nvidia.com/gpu.product, most specific pattern first.
_GPU_MEMORY_GIB = [
    (r"B200", 180),
    (r"H200", 141),
    (r"(80GB|H100|H800|GH200)", 80),
    (r"L40", 48),
    (r"(40GB|A100)", 40),
    (r"(A10G?|L4|A30|3090|4090)\b", 24),
    (r"V100.*32GB", 32),
    (r"(T4|V100)", 16),
]
_NO_BF16 = re.compile(r"(T4|V100|P100|P4)\b")
_QUANTITY = re.compile(r"^([0-9.]+)([EPTGMK]i?|[eE][0-9]+)?$")
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def gpu_memory_gib(gpu_type: str | None) -> int:
    """GPU memory for a product name (as in the nvidia.com/gpu.product label)."""
    for pattern, gib in _GPU_MEMORY_GIB:
        if gpu_type and re.search(pattern, gpu_type):
            return gib
    return UNKNOWN_GPU_MEMORY_GIB


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (32Gi, 500M, 1e9) in bytes."""
    match = _QUANTITY.match(quantity.strip())
    if not match:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    number, unit = float(match.group(1)), match.group(2) or ""
    if unit.startswith(("e", "E")) and unit[1:].isdigit():
        return int(number * 10 ** int(unit[1:]))
    if unit.endswith("i"):
        return int(number * 1024 ** ("KMGTPE".index(unit[0]) + 1))
    return int(number * _UNITS[unit])


def world_size(spec: FineTuningJobSpec) -> int:
    """Training processes over all pods: one per GPU, or processesPerNode on CPUs."""
    per_node = spec.resources.gpus or spec.distributed.processes_per_node or 1
    return spec.resources.nodes * per_node


def processes_per_node(spec: FineTuningJobSpec) -> int:
    return spec.resources.gpus or spec.distributed.processes_per_node or 1


def _precision(spec: FineTuningJobSpec, on_gpu: bool) -> Precision:
    precision = spec.hyperparameters.precision
    if precision != Precision.AUTO:
        return precision
    if not on_gpu:
        return Precision.FP32
    if spec.resources.gpu_type and _NO_BF16.search(spec.resources.gpu_type):
        return Precision.FP16
    return Precision.BF16


def _workload(spec: FineTuningJobSpec, precision: Precision, shards: int) -> Workload:
    quantization = spec.quantization
    return Workload(
        method=spec.method.value,
        precision=precision.value,
        tokens_per_micro_batch=spec.hyperparameters.max_seq_length,
        gradient_checkpointing=False,
        shards=shards,
        quantization_bits=quantization.bits if quantization else 4,
        lora_rank=spec.lora.rank if spec.lora else 8,
        on_gpu=spec.resources.gpus > 0,
    )


def _fit(
    spec: FineTuningJobSpec,
    model: ModelShape,
    precision: Precision,
    memory_bytes: int,
    shards: int,
    max_batch: int,
) -> Fit:
    hp = spec.hyperparameters
    checkpointing = hp.gradient_checkpointing
    if spec.method == FineTuningMethod.PREFIX_TUNING:
        checkpointing = False  # the prefix lives in the attention cache that checkpointing drops
    return fit_batch(
        model,
        _workload(spec, precision, shards),
        memory_bytes=memory_bytes,
        seq_length=hp.max_seq_length,
        max_batch=max_batch,
        batch_size=None if hp.batch_size == AUTO else hp.batch_size,
        gradient_checkpointing=checkpointing,
    )


def _strategy(
    spec: FineTuningJobSpec,
    model: ModelShape,
    precision: Precision,
    memory_bytes: int,
    world: int,
    max_batch: int,
    decisions: list[str],
) -> DistributedStrategy:
    requested = spec.distributed.strategy
    if world == 1:
        return DistributedStrategy.NONE
    if requested != DistributedStrategy.AUTO:
        return requested
    if spec.method == FineTuningMethod.FULL:
        decisions.append(
            f"distributed fsdp: FULL fine-tuning shards weights, gradients and AdamW state "
            f"over {world} processes"
        )
        return DistributedStrategy.FSDP
    unsharded = _fit(spec, model, precision, memory_bytes, 1, max_batch)
    if unsharded.fits or spec.method != FineTuningMethod.LORA:
        decisions.append(
            f"distributed ddp: {spec.method.value} on a model that fits one device"
            if unsharded.fits
            else f"distributed ddp: {spec.method.value} cannot shard (fsdp supports FULL and LORA)"
        )
        return DistributedStrategy.DDP
    decisions.append(
        f"distributed fsdp: batch 1 needs an estimated {unsharded.estimate.total_gib:.1f} GiB "
        f"per device unsharded, over {memory_bytes / GIB:.0f} GiB"
    )
    return DistributedStrategy.FSDP


def resolve_hyperparameters(
    spec: FineTuningJobSpec,
    *,
    model: ModelShape | None = None,
    memory_bytes: int | None = None,
    model_source: str | None = None,
    processes: int | None = None,
) -> ResolvedHyperparameters:
    """Every "auto" in the spec replaced by a concrete value.

    `model` and `memory_bytes` are what the trainer knows (the model's config, the
    device's memory); without them the shape is guessed from the model's name and the
    memory from the GPU product (or the pod's memory request on CPUs). `processes` is
    the world size torchrun started, when the trainer resolves."""
    hp = spec.hyperparameters
    gpus = spec.resources.gpus
    on_gpu = gpus > 0
    decisions: list[str] = []
    world = processes or world_size(spec)
    precision = _precision(spec, on_gpu)
    if model is None:
        model = shape_from_name(spec.base_model.name)
        model_source = model_source or f"guessed from the name {spec.base_model.name!r}"
    if memory_bytes is None:
        if on_gpu:
            memory_bytes = gpu_memory_gib(spec.resources.gpu_type) * GIB
        else:
            memory_bytes = quantity_bytes(spec.resources.memory) // processes_per_node(spec)
    max_batch = MAX_AUTO_BATCH if on_gpu else MAX_AUTO_BATCH_CPU
    strategy = _strategy(spec, model, precision, memory_bytes, world, max_batch, decisions)
    shards = world if strategy == DistributedStrategy.FSDP else 1
    fit = _fit(spec, model, precision, memory_bytes, shards, max_batch)
    where = f"{memory_bytes / GIB:.0f} GiB" + (f" ({spec.resources.gpu_type})" if on_gpu else "")
    shape = (
        f"{model.parameters / 1e6:.0f}M parameters, hidden {model.hidden_size}, "
        f"{model.num_layers} layers, vocabulary {model.vocab_size}"
    )
    if hp.batch_size == AUTO:
        decisions.append(
            f"batchSize {fit.batch_size}: the largest power of two (up to {max_batch}) whose "
            f"estimated {fit.estimate.total_gib:.1f} GiB fits 85% of {where}; model {shape}"
            + (f", {model_source}" if model_source else "")
        )
    if hp.gradient_checkpointing is None and spec.method != FineTuningMethod.PREFIX_TUNING:
        decisions.append(
            "gradientCheckpointing on: batch 1 does not fit without it"
            if fit.gradient_checkpointing
            else "gradientCheckpointing off: the batch fits without recomputing activations"
        )
    if not fit.fits:
        decisions.append(
            f"warning: estimated {fit.estimate.total_gib:.1f} GiB per device exceeds 85% of "
            f"{where}; expect out-of-memory (use QLORA, a shorter maxSeqLength, more GPUs "
            "with fsdp, or a larger GPU)"
        )
    if hp.gradient_accumulation_steps == AUTO:
        accumulation = max(1, math.ceil(TARGET_EFFECTIVE_BATCH / (fit.batch_size * world)))
    else:
        accumulation = hp.gradient_accumulation_steps
    return ResolvedHyperparameters(
        epochs=AUTO_EPOCHS if hp.epochs == AUTO else hp.epochs,
        max_steps=hp.max_steps,
        batch_size=fit.batch_size,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=fit.batch_size * accumulation * world,
        world_size=world,
        distributed_strategy=strategy,
        learning_rate=hp.learning_rate
        if hp.learning_rate is not None
        else LEARNING_RATES[spec.method],
        lr_scheduler=hp.lr_scheduler,
        warmup_ratio=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        max_seq_length=hp.max_seq_length,
        packing=hp.packing,
        packing_strategy=hp.packing_strategy if hp.packing else "padded",
        attn_implementation=hp.attn_implementation,
        liger_kernel=bool(hp.liger_kernel),
        precision=precision,
        gradient_checkpointing=fit.gradient_checkpointing,
        eval_steps=hp.eval_steps,
        save_steps=hp.save_steps,
        logging_steps=hp.logging_steps,
        seed=spec.seed,
        estimated_memory_gib=round(fit.estimate.total_gib, 2),
        decisions=decisions,
    )
