"""The base model and tokenizer, and the fine-tuning method applied to them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kubetune.api.finetuningjob import (
    AttentionImplementation,
    ComputeDType,
    DistributedStrategy,
    FineTuningJobSpec,
    FineTuningMethod,
    Precision,
    QuantizationSettings,
    ResolvedHyperparameters,
)
from kubetune.api.trainer import TrainerConfig
from kubetune_trainer import attention
from kubetune_trainer.errors import InputNotFound, InvalidConfig

log = logging.getLogger(__name__)

DTYPES = {
    ComputeDType.BFLOAT16: torch.bfloat16,
    ComputeDType.FLOAT16: torch.float16,
    ComputeDType.FLOAT32: torch.float32,
}
ADAPTER_METHODS = (
    FineTuningMethod.LORA,
    FineTuningMethod.QLORA,
    FineTuningMethod.PREFIX_TUNING,
    FineTuningMethod.PROMPT_TUNING,
)


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained finds the base model."""

    name_or_path: str
    revision: str | None
    cache_dir: str | None
    trust_remote_code: bool
    token: str | None

    @classmethod
    def from_config(cls, config: TrainerConfig) -> ModelSource:
        base = config.spec.base_model
        local = config.paths.base_model
        if local and not Path(local).exists():
            raise InputNotFound(f"base model folder {local} does not exist")
        return cls(
            name_or_path=local or base.name,
            revision=None if local else base.revision,
            cache_dir=config.paths.cache,
            trust_remote_code=base.trust_remote_code,
            token=os.environ.get("HF_TOKEN") or None,
        )

    def kwargs(self) -> dict:
        return {
            "revision": self.revision,
            "cache_dir": self.cache_dir,
            "trust_remote_code": self.trust_remote_code,
            "token": self.token,
        }


PRECISION_DTYPES = {
    Precision.BF16: torch.bfloat16,
    Precision.FP16: torch.float16,
    Precision.FP32: torch.float32,
}


def check_precision(precision: Precision, device: torch.device) -> None:
    """Refuse a precision the device cannot train in, naming the fix."""
    if precision == Precision.BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidConfig(
            "hyperparameters.precision bf16 is not supported by this GPU: use fp16 or auto"
        )
    if precision == Precision.FP16 and device.type != "cuda":
        raise InvalidConfig(
            "hyperparameters.precision fp16 needs a GPU: use fp32 or bf16 on CPU (or auto)"
        )


def compute_dtype(settings: QuantizationSettings | None, precision: Precision) -> torch.dtype:
    """QLoRA's matmul dtype: the training precision's unless set explicitly, so a GPU
    without bfloat16 computes in float16 rather than failing."""
    chosen = (settings or QuantizationSettings()).compute_dtype
    if chosen == ComputeDType.AUTO:
        return PRECISION_DTYPES[precision]
    if (
        chosen == ComputeDType.BFLOAT16
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        raise InvalidConfig(
            "quantization.computeDtype bfloat16 is not supported by this GPU: use float16 or auto"
        )
    return DTYPES[chosen]


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs())
    except (OSError, ValueError) as err:
        raise InputNotFound(
            f"tokenizer of {source.name_or_path!r} cannot be loaded: {err}"
        ) from err
    if tokenizer.pad_token_id is None:
        # Padding is masked by position, so reusing EOS never hides a real EOS label.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def hidden_size(source: ModelSource) -> int:
    """The model's hidden size, from its config alone (before the weights are loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.name_or_path, **source.kwargs())
    except (OSError, ValueError) as err:
        raise InputNotFound(f"base model {source.name_or_path!r} cannot be loaded: {err}") from err
    return int(getattr(config.get_text_config(), "hidden_size", 0) or 0)


def quantization_config(settings: QuantizationSettings | None, precision: Precision):
    from transformers import BitsAndBytesConfig

    settings = settings or QuantizationSettings()
    if settings.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type.value,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(settings, precision),
    )


def weights_dtype(spec: FineTuningJobSpec, hp: ResolvedHyperparameters) -> torch.dtype:
    """fp32 master weights for FULL and under FSDP (which casts to the training precision
    itself, and needs one dtype per shard group); frozen 16-bit weights for adapters."""
    if (
        spec.method in ADAPTER_METHODS
        and hp.distributed_strategy != DistributedStrategy.FSDP
        and hp.precision in (Precision.BF16, Precision.FP16)
    ):
        return PRECISION_DTYPES[hp.precision]
    return torch.float32


def load_base_model(
    source: ModelSource,
    spec: FineTuningJobSpec,
    hp: ResolvedHyperparameters,
    device: torch.device,
    *,
    quantized: bool | None = None,
):
    """The base model on the device, in weights_dtype (QLORA: 4 or 8 bits), with the
    resolved attention kernel."""
    from transformers import AutoModelForCausalLM

    quantized = spec.method == FineTuningMethod.QLORA if quantized is None else quantized
    kwargs = {"dtype": weights_dtype(spec, hp), **source.kwargs()}
    if hp.attn_implementation == AttentionImplementation.SDPA_VARLEN:
        attention.register()
    if hp.attn_implementation != AttentionImplementation.AUTO:
        kwargs["attn_implementation"] = hp.attn_implementation.value
    if quantized:
        kwargs["quantization_config"] = quantization_config(spec.quantization, hp.precision)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    except OSError as err:
        raise InputNotFound(f"base model {source.name_or_path!r} cannot be loaded: {err}") from err
    if not quantized:
        model.to(device)
    model.config.use_cache = False  # a cache would also disable packed attention boundaries
    disable_cpu_4bit_repacking(model)
    return model


def disable_cpu_4bit_repacking(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights during an eval forward
    into a layout the training path cannot use; keep the portable layout everywhere."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_method(model, spec: FineTuningJobSpec, source: ModelSource):
    """Wrap the base model for the method; only the method's parameters stay trainable.
    (Gradient checkpointing is switched on by the Trainer, which also makes the inputs of
    a frozen base require gradients.)"""
    method = spec.method
    if method == FineTuningMethod.FULL:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
        get_peft_model,
    )

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if method in (FineTuningMethod.LORA, FineTuningMethod.QLORA):
        lora = spec.lora
        peft_config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora.rank if lora else 8,
            lora_alpha=lora.alpha if lora else 16,
            lora_dropout=lora.dropout if lora else 0.05,
            target_modules=(lora.target_modules if lora and lora.target_modules else "all-linear"),
        )
    elif method == FineTuningMethod.PREFIX_TUNING:
        settings = spec.prefix_tuning
        peft_config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=settings.num_virtual_tokens if settings else 20,
        )
    else:
        settings = spec.prompt_tuning
        init_text = settings.init_text if settings else None
        peft_config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=settings.num_virtual_tokens if settings else 20,
            prompt_tuning_init=PromptTuningInit.TEXT if init_text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=init_text,
            tokenizer_name_or_path=source.name_or_path if init_text else None,
        )
    device = next(model.parameters()).device
    model = get_peft_model(model, peft_config)
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(
        model, "is_loaded_in_8bit", False
    ):
        model.to(device)  # virtual-token embeddings are created on the CPU
    upcast_trainable(model)
    disable_cpu_4bit_repacking(model)
    return model


def upcast_trainable(model) -> None:
    """Trainable adapter weights in fp32 even on a 16-bit or 4-bit base: AdamW updates
    smaller than bf16 can represent would otherwise be lost, and fp16 gradient scaling
    refuses fp16 parameters."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def packing_supported(model, device: torch.device) -> bool:
    """Whether a padding-free packed row gives the same logits as separate rows.

    Checked on the real model with two short sequences, so a model whose attention
    ignores position_ids boundaries falls back to padded batches instead of
    silently attending across examples."""
    vocab = model.config.vocab_size
    first = torch.tensor([[1 % vocab, 5 % vocab, 9 % vocab]], device=device)
    second = torch.tensor([[7 % vocab, 3 % vocab]], device=device)
    packed = torch.cat([first, second], dim=1)
    positions = torch.tensor([[0, 1, 2, 0, 1]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=second, use_cache=False).logits.float()
            together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
            leaking = model(input_ids=packed, use_cache=False).logits  # plain causal row
    except Exception as err:  # an architecture that refuses position_ids
        log.info("padding-free packing unavailable: %s", err)
        return False
    finally:
        model.train(was_training)
    packed_error = (together[:, 3:].float() - alone).abs().max().item()
    leak_error = (leaking[:, 3:].float() - alone).abs().max().item()
    # Attending across the boundary moves the logits by leak_error; a correct packed
    # forward must stay far closer to the separate pass than that.
    return packed_error <= 0.05 * leak_error
