"""What `auto` means on the hardware the trainer actually runs on.

The operator resolves what it can from the spec (kubetune.api.defaults); these
choices need the device, the installed kernels and the dataset's lengths, so
the trainer makes them and reports them with its progress. The rules, in
docs/auto.md:

* precision: bf16 autocast on CPUs that compute bfloat16 natively (AVX512-BF16
  or AMX) for models with a hidden size of 512 or more (below, casting costs
  more than the narrower matmuls save), except for QLoRA, whose CPU 4-bit
  kernels are kept in fp32;
* attention: flash_attention_2 on NVIDIA GPUs of compute capability 8.0 or
  newer when the flash-attn package is installed, else sdpa_varlen (SDPA run
  per example of a padding-free row, see attention.py); plain SDPA for the
  virtual-token methods, which train on padded rows;
* Liger kernels: on NVIDIA GPUs when liger-kernel is installed;
* packing: padding-free when the attention kernel is variable-length (flash
  attention and sdpa_varlen attend within each example, so a flattened
  micro-batch costs what its examples cost alone). Otherwise a flattened row of n tokens costs n² attention
  scores under a dense block-diagonal mask, and padded rows of similar lengths
  may be cheaper: both are costed on the dataset's own lengths and the cheaper
  one wins. Prefix and prompt tuning always train on padded rows, since their
  virtual tokens are prepended once per row.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.finetuningjob import (
    AttentionImplementation,
    FineTuningMethod,
    PackingStrategy,
    Precision,
)

VIRTUAL_TOKEN_METHODS = (FineTuningMethod.PREFIX_TUNING, FineTuningMethod.PROMPT_TUNING)
VARLEN_ATTENTION = (
    AttentionImplementation.SDPA_VARLEN,
    AttentionImplementation.FLASH_ATTENTION_2,
    AttentionImplementation.FLASH_ATTENTION_3,
)
# transformers' LengthGroupedSampler sorts within mega-batches of this many batches.
LENGTH_GROUPING_MEGABATCH = 50


@dataclass(frozen=True)
class Hardware:
    """What the trainer's process can use."""

    device: str  # "cuda" or "cpu"
    compute_capability: tuple[int, int] | None = None
    flash_attn_installed: bool = False
    liger_installed: bool = False
    cpu_bf16: bool = False  # the CPU computes bfloat16 natively

    @classmethod
    def detect(cls) -> Hardware:
        import torch

        if not torch.cuda.is_available():
            return cls(device="cpu", cpu_bf16=_cpu_has_native_bf16())
        return cls(
            device="cuda",
            compute_capability=torch.cuda.get_device_capability(),
            flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
            liger_installed=importlib.util.find_spec("liger_kernel") is not None,
        )


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


@dataclass(frozen=True)
class Choice:
    value: object
    reason: str


CPU_BF16_MIN_HIDDEN = 512


def choose_cpu_precision(method: FineTuningMethod, hardware: Hardware, hidden_size: int) -> Choice:
    """For `precision: auto` on a CPU (the operator resolves fp32 without seeing it)."""
    if not hardware.cpu_bf16:
        return Choice(Precision.FP32, "precision fp32: this CPU has no native bfloat16")
    if method == FineTuningMethod.QLORA:
        return Choice(Precision.FP32, "precision fp32: QLoRA's 4-bit CPU kernels stay in fp32")
    if hidden_size < CPU_BF16_MIN_HIDDEN:
        return Choice(
            Precision.FP32,
            f"precision fp32: at hidden size {hidden_size} casting to bfloat16 costs more than "
            "it saves",
        )
    return Choice(
        Precision.BF16,
        "precision bf16: this CPU computes bfloat16 natively (AVX512-BF16/AMX); weights "
        "stay fp32, matmuls autocast",
    )


def choose_attention(
    requested: AttentionImplementation, hardware: Hardware, method: FineTuningMethod
) -> Choice:
    if requested != AttentionImplementation.AUTO:
        return Choice(requested, f"attnImplementation {requested.value}: as requested")
    if method == FineTuningMethod.PREFIX_TUNING:
        return Choice(
            AttentionImplementation.SDPA,
            "attnImplementation sdpa: the prefix is an attention cache with its own mask",
        )
    if method == FineTuningMethod.PROMPT_TUNING:
        return Choice(
            AttentionImplementation.SDPA,
            "attnImplementation sdpa: prompt tuning trains on padded rows",
        )
    capable = hardware.compute_capability is not None and hardware.compute_capability >= (8, 0)
    if hardware.device == "cuda" and capable and hardware.flash_attn_installed:
        return Choice(
            AttentionImplementation.FLASH_ATTENTION_2,
            "attnImplementation flash_attention_2: installed, and the GPU is compute "
            "capability 8.0 or newer",
        )
    why = (
        "no GPU"
        if hardware.device != "cuda"
        else "flash-attn is not installed"
        if not hardware.flash_attn_installed
        else "the GPU is older than compute capability 8.0"
    )
    return Choice(
        AttentionImplementation.SDPA_VARLEN,
        f"attnImplementation sdpa_varlen: {why}; SDPA per example of a padding-free row "
        "instead of a dense mask over the whole row",
    )


def choose_liger(requested: bool | None, hardware: Hardware) -> Choice:
    if requested is not None:
        return Choice(requested, f"ligerKernel {str(requested).lower()}: as requested")
    if hardware.device == "cuda" and hardware.liger_installed:
        return Choice(True, "ligerKernel on: NVIDIA GPU with liger-kernel installed")
    why = "no GPU" if hardware.device != "cuda" else "liger-kernel is not installed"
    return Choice(False, f"ligerKernel off: {why}")


@dataclass(frozen=True)
class CostModel:
    """Relative operations of a forward pass: per token through the weights, and per
    pair of positions in attention (QK^T and AV over every layer)."""

    per_token: float
    per_score: float

    @classmethod
    def of(cls, parameters: int, hidden_size: int, num_layers: int) -> CostModel:
        return cls(per_token=2.0 * parameters, per_score=4.0 * hidden_size * num_layers)


def _batches(lengths: Sequence[int], batch_size: int, grouped: bool, seed: int) -> list[list[int]]:
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if grouped:
        window = batch_size * LENGTH_GROUPING_MEGABATCH
        order = [
            index
            for start in range(0, len(order), window)
            for index in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    return [
        [lengths[i] for i in order[start : start + batch_size]]
        for start in range(0, len(order), batch_size)
    ]


def padding_free_cost(lengths: Sequence[int], batch_size: int, cost: CostModel, seed: int = 0):
    """One flattened row per micro-batch, dense block-diagonal mask: every score of the
    row is computed."""
    total = 0.0
    for batch in _batches(lengths, batch_size, grouped=False, seed=seed):
        tokens = sum(batch)
        total += tokens * cost.per_token + tokens * tokens * cost.per_score
    return total


def padded_cost(lengths: Sequence[int], batch_size: int, cost: CostModel, seed: int = 0):
    """Length-grouped rows padded to the longest of each micro-batch."""
    total = 0.0
    for batch in _batches(lengths, batch_size, grouped=True, seed=seed):
        width = max(batch)
        total += len(batch) * (width * cost.per_token + width * width * cost.per_score)
    return total


def choose_packing(
    *,
    packing: bool,
    requested: PackingStrategy,
    method: FineTuningMethod,
    attention: AttentionImplementation,
    lengths: Sequence[int],
    batch_size: int,
    cost: CostModel,
    isolation_checked: bool,
) -> Choice:
    """padding_free, bfd or padded for this run (see the module docstring)."""
    if not packing:
        return Choice(PackingStrategy.PADDED, "packing padded: packing is off")
    if method in VIRTUAL_TOKEN_METHODS:
        return Choice(
            PackingStrategy.PADDED,
            f"packing padded: {method.value} prepends its virtual tokens once per row",
        )
    if not isolation_checked:
        return Choice(
            PackingStrategy.PADDED,
            "packing padded: this model's attention does not keep packed examples apart",
        )
    if requested in (PackingStrategy.PADDING_FREE, PackingStrategy.BFD, PackingStrategy.PADDED):
        return Choice(requested, f"packing {requested.value}: as requested")
    if attention in VARLEN_ATTENTION:
        return Choice(
            PackingStrategy.PADDING_FREE,
            f"packing padding_free: {attention.value} attends within each example only",
        )
    flat = padding_free_cost(lengths, batch_size, cost)
    padded = padded_cost(lengths, batch_size, cost)
    if flat <= padded:
        return Choice(
            PackingStrategy.PADDING_FREE,
            f"packing padding_free: {padded / flat:.2f}x fewer operations than padded rows "
            "on this dataset's lengths",
        )
    return Choice(
        PackingStrategy.PADDED,
        f"packing padded (length-grouped): {flat / padded:.2f}x fewer operations than one "
        "flattened row per micro-batch under a dense mask, on this dataset's lengths",
    )
