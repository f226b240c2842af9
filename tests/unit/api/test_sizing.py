"""The memory estimate behind `auto`, against a table of models x GPUs x methods."""

from __future__ import annotations

import pytest

from kubetune.api.defaults import gpu_memory_gib, resolve_hyperparameters
from kubetune.api.finetuningjob import FineTuningJobSpec
from kubetune.api.sizing import (
    GIB,
    USABLE_FRACTION,
    ModelShape,
    Workload,
    estimate_memory,
    parameters_from_name,
)

MODELS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShape(134_515_008, 576, 30, 49_152),
    "Qwen/Qwen2.5-0.5B": ModelShape(494_032_768, 896, 24, 151_936),
    "meta-llama/Llama-3.2-1B": ModelShape(1_235_814_400, 2048, 16, 128_256),
    "meta-llama/Llama-3.1-8B": ModelShape(8_030_261_248, 4096, 32, 128_256),
    "meta-llama/Llama-3.1-70B": ModelShape(70_553_706_496, 8192, 80, 128_256),
}
GPUS = ["Tesla-T4", "NVIDIA-L4", "NVIDIA-A100-SXM4-40GB", "NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"]
METHODS = ["FULL", "LORA", "QLORA", "PREFIX_TUNING", "PROMPT_TUNING"]


def spec(model, method, gpu, *, gpus=1, nodes=1, seq=1024, **hyperparameters):
    document = {
        "baseModel": {"name": model, "revision": "main"},
        "dataset": {"format": "JSONL", "volume": {"claimName": "d"}},
        "output": {"volume": {"claimName": "o"}},
        "method": method,
        "resources": {"gpus": gpus, "gpuType": gpu, "nodes": nodes},
        "hyperparameters": {"maxSeqLength": seq, **hyperparameters},
    }
    return FineTuningJobSpec.model_validate(document)


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6),
        ("meta-llama/Llama-3.2-1B", 1e9),
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.5e9),
        ("mistralai/Mixtral-8x7B-v0.1", 56e9),
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", 70e9),
        ("google/gemma-2-9b-it", 9e9),
        ("gpt2", None),
        ("org/model-v3.2", None),
    ],
)
def test_parameters_from_the_name(name, parameters) -> None:
    assert parameters_from_name(name) == (int(parameters) if parameters else None)


def test_a_shape_guessed_from_the_parameter_count_is_close_to_real_ones() -> None:
    for real in MODELS.values():
        guess = ModelShape.from_parameters(real.parameters, real.vocab_size)
        ratio = (guess.hidden_size * guess.num_layers) / (real.hidden_size * real.num_layers)
        assert 0.6 < ratio < 1.6, (real, guess)


@pytest.mark.parametrize(
    ("method", "precision", "low", "high"),
    [
        # Published figures for Llama-3.1-8B at batch 1 x 1024, no checkpointing, bf16:
        # QLoRA ~10 GiB, LoRA ~20 GiB, full fine-tuning ~130 GiB (16 bytes per weight).
        ("QLORA", "bf16", 8, 14),
        ("LORA", "bf16", 16, 24),
        ("FULL", "bf16", 115, 140),
    ],
)
def test_estimates_are_in_the_range_of_published_figures(method, precision, low, high) -> None:
    work = Workload(method, precision, tokens_per_micro_batch=1024, gradient_checkpointing=False)
    total = estimate_memory(MODELS["meta-llama/Llama-3.1-8B"], work).total_gib
    assert low <= total <= high


def test_checkpointing_and_sharding_save_what_they_should() -> None:
    model = MODELS["meta-llama/Llama-3.1-8B"]
    plain = estimate_memory(model, Workload("LORA", "bf16", 8192, False))
    checkpointed = estimate_memory(model, Workload("LORA", "bf16", 8192, True))
    assert checkpointed.activations < plain.activations / 10
    full = estimate_memory(model, Workload("FULL", "bf16", 1024, False))
    sharded = estimate_memory(model, Workload("FULL", "bf16", 1024, False, shards=8))
    assert sharded.weights == full.weights // 8 and sharded.optimizer == full.optimizer // 8
    assert sharded.activations == full.activations


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("method", METHODS)
def test_auto_fits_the_gpu_or_says_it_cannot(model, gpu, method) -> None:
    resolved = resolve_hyperparameters(spec(model, method, gpu), model=MODELS[model])
    budget = gpu_memory_gib(gpu) * USABLE_FRACTION
    warned = any(d.startswith("warning") for d in resolved.decisions)
    assert warned == (resolved.estimated_memory_gib > budget)
    if warned:
        # Nothing smaller would have fitted: batch 1, checkpointing on (where allowed).
        assert resolved.batch_size == 1
        assert resolved.gradient_checkpointing or method == "PREFIX_TUNING"
    elif resolved.gradient_checkpointing:
        # Checkpointing only when batch 1 does not fit without it.
        without = resolve_hyperparameters(
            spec(model, method, gpu, batchSize=1, gradientCheckpointing=False),
            model=MODELS[model],
        )
        assert without.estimated_memory_gib > budget
    assert resolved.effective_batch_size >= 16


def test_qlora_8b_on_an_h100_fits_instead_of_batch_64() -> None:
    resolved = resolve_hyperparameters(
        spec("meta-llama/Llama-3.1-8B", "QLORA", "NVIDIA-H100-80GB-HBM3"),
        model=MODELS["meta-llama/Llama-3.1-8B"],
    )
    assert resolved.batch_size <= 16
    assert resolved.estimated_memory_gib <= 80 * USABLE_FRACTION


def test_auto_batch_shrinks_with_sequence_length_and_vocabulary() -> None:
    model = MODELS["meta-llama/Llama-3.2-1B"]
    gpu = "NVIDIA-A100-SXM4-40GB"
    short = resolve_hyperparameters(spec("m", "LORA", gpu, seq=512), model=model).batch_size
    long = resolve_hyperparameters(spec("m", "LORA", gpu, seq=4096), model=model).batch_size
    assert long < short
    small_vocab = ModelShape(model.parameters, model.hidden_size, model.num_layers, 32_000)
    huge_vocab = ModelShape(model.parameters, model.hidden_size, model.num_layers, 1_000_000)
    assert estimate_memory(huge_vocab, Workload("LORA", "bf16", 8192, False)).logits > (
        estimate_memory(small_vocab, Workload("LORA", "bf16", 8192, False)).logits
    )


def test_distributed_strategy_and_world_size() -> None:
    big = MODELS["meta-llama/Llama-3.1-70B"]
    full = resolve_hyperparameters(
        spec("m", "FULL", "NVIDIA-H100-80GB-HBM3", gpus=8, nodes=4), model=big
    )
    assert (full.world_size, full.distributed_strategy) == (32, "fsdp")
    assert full.estimated_memory_gib <= 80 * USABLE_FRACTION  # sharded 32 ways it fits
    assert full.effective_batch_size == full.batch_size * full.gradient_accumulation_steps * 32
    lora_small = resolve_hyperparameters(
        spec("m", "LORA", "NVIDIA-H100-80GB-HBM3", gpus=8), model=MODELS["meta-llama/Llama-3.1-8B"]
    )
    assert lora_small.distributed_strategy == "ddp"
    lora_big = resolve_hyperparameters(spec("m", "LORA", "NVIDIA-L4", gpus=8), model=big)
    assert lora_big.distributed_strategy == "fsdp"
    qlora_big = resolve_hyperparameters(spec("m", "QLORA", "NVIDIA-L4", gpus=8), model=big)
    assert qlora_big.distributed_strategy == "ddp"  # 4-bit weights do not shard
    single = resolve_hyperparameters(spec("m", "FULL", "NVIDIA-L4"), model=big)
    assert (single.world_size, single.distributed_strategy) == (1, "none")
    cpu = FineTuningJobSpec.model_validate(
        {
            **spec("m", "LORA", None).model_dump(by_alias=True, exclude_none=True),
            "resources": {"gpus": 0, "nodes": 2, "memory": "16Gi"},
            "distributed": {"processesPerNode": 2},
        }
    )
    resolved = resolve_hyperparameters(cpu, model=MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert resolved.world_size == 4 and resolved.precision == "fp32"
    assert (
        resolved.effective_batch_size
        == resolved.batch_size * resolved.gradient_accumulation_steps * 4
    )


def test_explicit_settings_are_kept_and_the_memory_is_still_estimated() -> None:
    resolved = resolve_hyperparameters(
        spec(
            "meta-llama/Llama-3.1-8B",
            "LORA",
            "NVIDIA-L4",
            batchSize=32,
            gradientCheckpointing=False,
        )
    )
    assert (resolved.batch_size, resolved.gradient_checkpointing) == (32, False)
    assert resolved.estimated_memory_gib * GIB > 24 * GIB
    assert any(d.startswith("warning") for d in resolved.decisions)
