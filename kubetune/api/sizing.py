"""How much device memory a training step takes, and what fits.

A deliberately simple, documented estimate (docs/auto.md) that `auto` uses to
pick the batch size and whether to recompute activations. The operator runs it
with a model shape guessed from the model's name and the GPU product; the
trainer runs it again with the real model config and the device's real memory
and reports what it used. Pure functions, no I/O.

Per device, in bytes, for `t` tokens in a micro-batch:

* weights: parameters x bytes per weight (FULL keeps fp32 masters; adapters
  freeze the base in the training precision; QLORA stores 4 or 8 bits plus
  16-bit embeddings), divided by the shard count under FSDP;
* gradients and AdamW state: 12 bytes per trainable parameter (fp32 gradient
  and two moments), sharded under FSDP; adapters train ~16·r·hidden·layers
  parameters;
* activations: per token and layer, 34·hidden bytes in 16-bit precision (the
  Megatron estimate without the attention scores, which SDPA and flash
  attention never store), twice that in fp32; with checkpointing only each
  layer's 16-bit input stays, plus one layer's activations while recomputing;
* logits: TRL's fused LM head never builds the full logits; its tiles hold at
  most 4096 tokens x vocabulary in fp32, counted twice (forward and backward);
* a fixed 1.5 GiB on GPUs for the CUDA context, allocator fragmentation and
  buffers; 0.5 GiB on CPUs for the interpreter and its libraries.

The batch is the largest power of two whose estimate stays under 85% of the
device's memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GIB = 1024**3
USABLE_FRACTION = 0.85
GPU_OVERHEAD_BYTES = int(1.5 * GIB)
CPU_OVERHEAD_BYTES = int(0.5 * GIB)
LOGIT_TILE_TOKENS = 4096
ADAM_BYTES_PER_TRAINABLE = 12  # fp32 gradient + exp_avg + exp_avg_sq
ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN_16BIT = 34
DEFAULT_VOCAB = 128_256  # the largest common vocabulary (Llama 3): errs on the safe side
UNKNOWN_MODEL_PARAMETERS = 8_000_000_000  # a model whose size cannot be told: assume 8B


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a model."""

    parameters: int
    hidden_size: int
    num_layers: int
    vocab_size: int

    @classmethod
    def from_parameters(cls, parameters: float, vocab_size: int = DEFAULT_VOCAB) -> ModelShape:
        """A plausible decoder shape for a parameter count: hidden grows as P^0.45, the
        embeddings take vocabulary x hidden (at most 40% of the model), and layers make up
        the rest at 12·hidden² parameters each. Within ~50% of Llama, Qwen and SmolLM
        shapes in hidden x layers, which is what activations scale with."""
        hidden = max(256, int(4096 * (parameters / 8e9) ** 0.45) // 64 * 64)
        embeddings = min(vocab_size * hidden, 0.4 * parameters)
        layers = max(2, round((parameters - embeddings) / (12 * hidden * hidden)))
        return cls(int(parameters), hidden, layers, vocab_size)


_SIZE = re.compile(r"(?<![0-9a-z.])(?:(\d+)x)?(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", re.IGNORECASE)


def parameters_from_name(name: str) -> int | None:
    """Parameter count written in a model's name: Llama-3.2-1B, SmolLM2-135M-Instruct,
    Qwen2.5-0.5B, Mixtral-8x7B (experts x size). None when the name does not say."""
    found = None
    for match in _SIZE.finditer(name):
        experts, size, unit = match.groups()
        value = float(size) * (1e9 if unit.lower() == "b" else 1e6) * int(experts or 1)
        found = int(value)  # the last size in the name is the model's (not a version like 3.2)
    return found


def shape_from_name(name: str) -> ModelShape:
    """The shape the operator assumes before the trainer has read the model's config."""
    return ModelShape.from_parameters(parameters_from_name(name) or UNKNOWN_MODEL_PARAMETERS)


@dataclass(frozen=True)
class Workload:
    """One training step's settings, as far as memory is concerned."""

    method: str  # FineTuningMethod value
    precision: str  # resolved Precision value: bf16, fp16 or fp32
    tokens_per_micro_batch: int
    gradient_checkpointing: bool
    shards: int = 1  # FSDP world size; 1 for a single process or DDP
    quantization_bits: int = 4
    lora_rank: int = 8
    on_gpu: bool = True


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    optimizer: int
    activations: int
    logits: int
    overhead: int = GPU_OVERHEAD_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.logits + self.overhead

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def trainable_parameters(model: ModelShape, method: str, lora_rank: int) -> int:
    if method == "FULL":
        return model.parameters
    if method in ("LORA", "QLORA"):
        # Seven projections per layer, each adding r x (in + out) with in + out ≈ 2.3 hidden.
        return 16 * lora_rank * model.hidden_size * model.num_layers
    return 64 * model.hidden_size * model.num_layers  # prefix/prompt: tiny


def estimate_memory(model: ModelShape, work: Workload) -> MemoryEstimate:
    sixteen_bit = work.precision in ("bf16", "fp16")
    embeddings = 2 * model.vocab_size * model.hidden_size  # input and output embeddings
    if work.method == "FULL":
        weight_bytes = 4 * model.parameters
    elif work.method == "QLORA":
        body = max(model.parameters - embeddings, 0)
        weight_bytes = int(body * (work.quantization_bits / 8) * 1.07) + 2 * embeddings
    else:
        weight_bytes = (2 if sixteen_bit else 4) * model.parameters
    trainable = trainable_parameters(model, work.method, work.lora_rank)
    optimizer = ADAM_BYTES_PER_TRAINABLE * trainable
    if work.method != "FULL":
        optimizer += 4 * trainable  # adapters keep fp32 masters beside a 16-bit base
    shards = max(work.shards, 1)
    per_token_layer = ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN_16BIT * model.hidden_size
    if not sixteen_bit:
        per_token_layer *= 2
    tokens = work.tokens_per_micro_batch
    if work.gradient_checkpointing:
        activations = tokens * (2 * model.hidden_size * model.num_layers + per_token_layer)
    else:
        activations = tokens * per_token_layer * model.num_layers
    logits = 2 * 4 * min(tokens, LOGIT_TILE_TOKENS) * model.vocab_size
    return MemoryEstimate(
        weights=weight_bytes // shards,
        optimizer=optimizer // shards,
        activations=activations,
        logits=logits,
        overhead=GPU_OVERHEAD_BYTES if work.on_gpu else CPU_OVERHEAD_BYTES,
    )


@dataclass(frozen=True)
class Fit:
    batch_size: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    fits: bool  # False: even batch 1 with checkpointing is over the budget


def fit_batch(
    model: ModelShape,
    work: Workload,
    *,
    memory_bytes: int,
    seq_length: int,
    max_batch: int,
    batch_size: int | None = None,
    gradient_checkpointing: bool | None = None,
) -> Fit:
    """The largest power-of-two batch (or the given one) that fits, preferring no
    checkpointing (it costs about a third more compute) unless it is asked for, and
    switching it on only when not even a batch of 1 fits without it."""
    budget = memory_bytes * USABLE_FRACTION
    options = [gradient_checkpointing] if gradient_checkpointing is not None else [False, True]
    last = None
    for checkpointing in options:
        candidates = (
            [batch_size]
            if batch_size
            else [1 << i for i in range(int(math.log2(max_batch)), -1, -1)]
        )
        for batch in candidates:
            estimate = estimate_memory(
                model,
                Workload(
                    method=work.method,
                    precision=work.precision,
                    tokens_per_micro_batch=batch * seq_length,
                    gradient_checkpointing=checkpointing,
                    shards=work.shards,
                    quantization_bits=work.quantization_bits,
                    lora_rank=work.lora_rank,
                    on_gpu=work.on_gpu,
                ),
            )
            last = Fit(batch, checkpointing, estimate, estimate.total <= budget)
            if last.fits:
                return last
    assert last is not None
    return last
