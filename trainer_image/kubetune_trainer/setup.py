"""The hyperparameters this process trains with: the operator's resolution, refined
with what only the trainer can see (the device, the model's config, the lengths).

Every refinement is a pure rule (kubetune.api.defaults, acceleration.py) and is
recorded in `decisions`, which the trainer reports to the job's status.
"""

from __future__ import annotations

import logging

import torch

from kubetune.api.defaults import resolve_hyperparameters
from kubetune.api.finetuningjob import (
    FineTuningJobSpec,
    FineTuningMethod,
    Precision,
    ResolvedHyperparameters,
)
from kubetune.api.sizing import ModelShape
from kubetune.api.trainer import TrainerConfig
from kubetune_trainer import acceleration, modeling
from kubetune_trainer.distributed import Processes
from kubetune_trainer.errors import InvalidConfig

log = logging.getLogger(__name__)

# Fields that depend on the model's size and the device's memory.
_MEMORY_FIELDS = (
    "batch_size",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "gradient_checkpointing",
    "distributed_strategy",
    "estimated_memory_gib",
)


def before_loading(
    config: TrainerConfig, hardware: acceleration.Hardware, hidden_size: int
) -> ResolvedHyperparameters:
    """Attention kernel, Liger kernels and precision for this device (and, on CPUs, the
    model's width, read from its config)."""
    spec, hp = config.spec, config.hyperparameters
    asked = spec.hyperparameters
    if spec.method == FineTuningMethod.PREFIX_TUNING and asked.gradient_checkpointing:
        raise InvalidConfig(
            "PREFIX_TUNING cannot use gradient checkpointing (its prefix lives in the attention "
            "cache, which checkpointing drops): leave hyperparameters.gradientCheckpointing out"
        )
    attention = acceleration.choose_attention(asked.attn_implementation, hardware, spec.method)
    liger = acceleration.choose_liger(asked.liger_kernel, hardware)
    update: dict = {"attn_implementation": attention.value, "liger_kernel": liger.value}
    decisions = [attention.reason, liger.reason]
    if asked.precision == Precision.AUTO and hardware.device == "cpu":
        precision = acceleration.choose_cpu_precision(spec.method, hardware, hidden_size)
        update["precision"] = precision.value
        decisions.append(precision.reason)
    elif (
        asked.precision == Precision.AUTO
        and hp.precision == Precision.BF16
        and hardware.device == "cuda"
        and not torch.cuda.is_bf16_supported()
    ):
        update["precision"] = Precision.FP16
        decisions.append("precision fp16: this GPU has no bfloat16")
    return hp.model_copy(update=update | {"decisions": [*hp.decisions, *decisions]})


def model_shape(model) -> ModelShape:
    config = model.config.get_text_config()
    return ModelShape(
        parameters=model.num_parameters(),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
    )


def after_loading(
    spec: FineTuningJobSpec, hp: ResolvedHyperparameters, model, device: torch.device
) -> ResolvedHyperparameters:
    """Batch size and checkpointing again, from the real model and device memory (the
    operator only had the model's name and the GPU's product name); the world size
    torchrun actually started."""
    world = Processes.from_environment().world_size
    asked = spec.hyperparameters
    memory = (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    )
    refined = resolve_hyperparameters(
        spec.model_copy(
            update={"hyperparameters": asked.model_copy(update={"precision": hp.precision})}
        ),
        model=model_shape(model),
        memory_bytes=memory,
        model_source="read from its config",
        processes=world,
    )
    decisions = [d for d in hp.decisions if not _is_memory_decision(d)] + refined.decisions
    if world != hp.world_size:
        decisions.append(
            f"worldSize {world}: the processes started (the spec asks for {hp.world_size})"
        )
    update = {name: getattr(refined, name) for name in _MEMORY_FIELDS}
    return hp.model_copy(update=update | {"world_size": world, "decisions": decisions})


def _is_memory_decision(decision: str) -> bool:
    return decision.startswith(("batchSize", "gradientCheckpointing", "distributed", "warning"))


def choose_packing(
    spec: FineTuningJobSpec,
    hp: ResolvedHyperparameters,
    model,
    device: torch.device,
    lengths: list[int],
) -> ResolvedHyperparameters:
    """padding_free, bfd or padded, checking first that this model keeps packed
    examples apart."""
    needs_check = hp.packing and spec.method not in acceleration.VIRTUAL_TOKEN_METHODS
    isolated = modeling.packing_supported(model, device) if needs_check else True
    shape = model_shape(model)
    choice = acceleration.choose_packing(
        packing=hp.packing,
        requested=spec.hyperparameters.packing_strategy,
        method=spec.method,
        attention=hp.attn_implementation,
        lengths=lengths,
        batch_size=hp.batch_size,
        cost=acceleration.CostModel.of(shape.parameters, shape.hidden_size, shape.num_layers),
        isolation_checked=isolated,
    )
    return hp.model_copy(
        update={"packing_strategy": choice.value, "decisions": [*hp.decisions, choice.reason]}
    )
