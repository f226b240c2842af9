"""What auto means on the trainer's hardware: attention, Liger, packing, QLoRA dtype."""

from __future__ import annotations

import pytest
import torch
from kubetune_trainer.acceleration import (
    CostModel,
    Hardware,
    choose_attention,
    choose_liger,
    choose_packing,
    padded_cost,
    padding_free_cost,
)
from kubetune_trainer.modeling import compute_dtype

from kubetune.api.finetuningjob import (
    AttentionImplementation,
    FineTuningMethod,
    PackingStrategy,
    Precision,
    QuantizationSettings,
)

CPU = Hardware(device="cpu")
A100 = Hardware("cuda", (8, 0), flash_attn_installed=True, liger_installed=True)
A100_BARE = Hardware("cuda", (8, 0))
T4 = Hardware("cuda", (7, 5), flash_attn_installed=True, liger_installed=True)
SMOLLM = CostModel.of(134_515_008, 576, 30)
AUTO = AttentionImplementation.AUTO


@pytest.mark.parametrize(
    ("hardware", "method", "expected"),
    [
        (CPU, FineTuningMethod.LORA, "sdpa_varlen"),
        (CPU, FineTuningMethod.FULL, "sdpa_varlen"),
        (CPU, FineTuningMethod.PROMPT_TUNING, "sdpa"),
        (A100, FineTuningMethod.LORA, "flash_attention_2"),
        (A100, FineTuningMethod.FULL, "flash_attention_2"),
        (A100, FineTuningMethod.PREFIX_TUNING, "sdpa"),
        (A100_BARE, FineTuningMethod.LORA, "sdpa_varlen"),
        (T4, FineTuningMethod.LORA, "sdpa_varlen"),
    ],
)
def test_attention(hardware, method, expected) -> None:
    choice = choose_attention(AUTO, hardware, method)
    assert choice.value == expected and choice.reason.startswith(f"attnImplementation {expected}")
    asked = choose_attention(AttentionImplementation.EAGER, A100, method)
    assert asked.value == "eager"


def test_liger() -> None:
    assert choose_liger(None, A100).value is True
    assert choose_liger(None, A100_BARE).value is False
    assert choose_liger(None, CPU).value is False
    assert choose_liger(False, A100).value is False


def pick(
    lengths,
    *,
    attention=AUTO,
    method=FineTuningMethod.LORA,
    requested=PackingStrategy.AUTO,
    packing=True,
    isolated=True,
):
    return choose_packing(
        packing=packing,
        requested=requested,
        method=method,
        attention=attention if attention != AUTO else AttentionImplementation.SDPA,
        lengths=lengths,
        batch_size=8,
        cost=SMOLLM,
        isolation_checked=isolated,
    )


def test_packing_follows_the_costs_of_the_lengths() -> None:
    # Under a dense mask a flattened row of n tokens costs n² scores; length-grouped
    # padded rows waste little padding, so they win, by far on long examples.
    skewed_short = [8, 120, 16, 12, 100, 9, 14, 10] * 16
    long_even = [2000, 1990, 2010, 1980] * 16
    for lengths in (skewed_short, long_even):
        choice = pick(lengths)
        assert choice.value == PackingStrategy.PADDED and "fewer operations" in choice.reason
    ratio = padding_free_cost(long_even, 8, SMOLLM) / padded_cost(long_even, 8, SMOLLM)
    assert ratio > 2
    # One example per micro-batch: the same cost, and no padding at all.
    assert (
        choose_packing(
            packing=True,
            requested=PackingStrategy.AUTO,
            method=FineTuningMethod.LORA,
            attention=AttentionImplementation.SDPA,
            lengths=skewed_short,
            batch_size=1,
            cost=SMOLLM,
            isolation_checked=True,
        ).value
        == PackingStrategy.PADDING_FREE
    )
    # A variable-length kernel never computes the masked blocks.
    for varlen in (AttentionImplementation.FLASH_ATTENTION_2, AttentionImplementation.SDPA_VARLEN):
        assert pick(long_even, attention=varlen).value == PackingStrategy.PADDING_FREE


def test_packing_rules_that_are_not_about_cost() -> None:
    lengths = [10, 20] * 8
    assert pick(lengths, packing=False).value == PackingStrategy.PADDED
    assert pick(lengths, method=FineTuningMethod.PROMPT_TUNING).value == PackingStrategy.PADDED
    assert pick(lengths, isolated=False).value == PackingStrategy.PADDED
    assert pick(lengths, requested=PackingStrategy.BFD).value == PackingStrategy.BFD


@pytest.mark.parametrize(
    ("precision", "expected"),
    [
        (Precision.BF16, torch.bfloat16),
        (Precision.FP16, torch.float16),
        (Precision.FP32, torch.float32),
    ],
)
def test_qlora_compute_dtype_follows_the_precision(precision, expected) -> None:
    assert compute_dtype(QuantizationSettings(), precision) == expected
    explicit = QuantizationSettings(compute_dtype="float32")
    assert compute_dtype(explicit, precision) == torch.float32


def test_cpu_precision() -> None:
    from kubetune_trainer.acceleration import choose_cpu_precision

    native = Hardware(device="cpu", cpu_bf16=True)
    assert choose_cpu_precision(FineTuningMethod.LORA, native, 576).value == Precision.BF16
    assert choose_cpu_precision(FineTuningMethod.FULL, native, 4096).value == Precision.BF16
    assert choose_cpu_precision(FineTuningMethod.QLORA, native, 576).value == Precision.FP32
    assert choose_cpu_precision(FineTuningMethod.LORA, CPU, 576).value == Precision.FP32
    # A tiny model: casting costs more than bfloat16 matmuls save.
    assert choose_cpu_precision(FineTuningMethod.LORA, native, 64).value == Precision.FP32
