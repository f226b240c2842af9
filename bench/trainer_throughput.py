"""Trainer throughput and memory, run by hand (`make bench`), not a test.

1. Real (non-padding) tokens per second on the same examples (skewed lengths),
   in the same process, one fresh model each, LoRA r16 on every linear layer:

   * kubetune's trainer core, with the packing that `auto` picks for these lengths
     (and, for reference, the other choice);
   * TRL's SFTTrainer at its fastest settings: padding-free, and BFD packing, both
     with gradient checkpointing off (TRL turns it on by default);
   * transformers' Trainer with `group_by_length`, and with its defaults.

   Also the training FLOP rate (useful work only: no padding, no masked scores)
   as a fraction of a large fp32 GEMM's rate measured in the same run.
2. Peak memory of each method (FULL, LORA, QLORA, PREFIX_TUNING, PROMPT_TUNING),
   each in its own process: on CPU the peak resident set while training (VmHWM
   reset after loading), on GPU torch's peak allocated memory.

    python bench/trainer_throughput.py [--model smollm2|tiny|both] [--skip-memory] [--repeats N]

On a shared or throttled machine one pass can be off by 20% either way: with
`--repeats N` every contender runs N times, interleaved, and the best is kept.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "trainer_image")]

from kubetune_trainer import acceleration, modeling  # noqa: E402
from kubetune_trainer.encoding import Example  # noqa: E402
from kubetune_trainer.training import build_trainer, sft_arguments  # noqa: E402

from kubetune.api.finetuningjob import (  # noqa: E402
    AttentionImplementation,
    FineTuningJobSpec,
    FineTuningMethod,
    PackingStrategy,
    ResolvedHyperparameters,
)

METHODS = ["FULL", "LORA", "QLORA", "PREFIX_TUNING", "PROMPT_TUNING"]
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0}


def model_folder(kind: str) -> Path:
    if kind == "smollm2":
        from kubetune.dev.models import smollm2

        return smollm2()
    from tests.unit.trainer.conftest import _cached_model

    return _cached_model("causal")


def skewed_examples(count: int, vocab: int, seed: int = 0) -> list[Example]:
    """Lengths from a log-normal: most examples short, a few long (as in chat data)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LogNormal samples from the global generator
    lengths = torch.distributions.LogNormal(4.0, 0.8).sample((count,)).clamp(8, 512).int()
    examples = []
    for length in lengths.tolist():
        ids = torch.randint(5, vocab, (length,), generator=generator).tolist()
        examples.append(Example(ids, list(ids)))
    return examples


def spec(method: str = "LORA") -> FineTuningJobSpec:
    document = {
        "baseModel": {"name": "bench", "volume": {"claimName": "m"}},
        "dataset": {"format": "JSONL", "volume": {"claimName": "d"}},
        "method": method,
        "output": {"volume": {"claimName": "o"}},
        "resources": {"gpus": 1 if torch.cuda.is_available() else 0},
    }
    if method in ("LORA", "QLORA"):
        document["lora"] = LORA
    return FineTuningJobSpec.model_validate(document)


def auto_precision(folder: Path, method: str = "LORA") -> str:
    if torch.cuda.is_available():
        return "bf16"
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(folder).hidden_size
    hardware = acceleration.Hardware.detect()
    return acceleration.choose_cpu_precision(FineTuningMethod(method), hardware, hidden).value.value


def hyperparameters(batch_size: int, strategy: str, **overrides) -> ResolvedHyperparameters:
    values = {
        "epochs": 1,
        "batchSize": batch_size,
        "gradientAccumulationSteps": 1,
        "effectiveBatchSize": batch_size,
        "learningRate": 1e-4,
        "lrScheduler": "constant",
        "warmupRatio": 0.0,
        "weightDecay": 0.0,
        "maxGradNorm": 1.0,
        "maxSeqLength": 512,
        "packing": True,
        "packingStrategy": strategy,
        "attnImplementation": "sdpa",
        "precision": "fp32",
        "gradientCheckpointing": False,
        "saveSteps": 10**6,
        "loggingSteps": 10**6,
        "seed": 0,
        **overrides,
    }
    return ResolvedHyperparameters.model_validate(values)


def auto_attention(method: str = "LORA") -> str:
    hardware = acceleration.Hardware.detect()
    choice = acceleration.choose_attention(
        AttentionImplementation.AUTO, hardware, FineTuningMethod(method)
    )
    return choice.value.value


def lora_model(
    folder: Path, method: str = "LORA", precision: str | None = None, attention: str = "sdpa"
):
    job = spec(method)
    hp = hyperparameters(
        8,
        "padded",
        precision=precision or auto_precision(folder, method),
        attnImplementation=attention,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = modeling.ModelSource(str(folder), None, None, False, None)
    torch.manual_seed(0)
    model = modeling.load_base_model(source, job, hp, device)
    return modeling.apply_method(model, job, source), modeling.load_tokenizer(source)


def timed_train(trainer) -> float:
    started = time.perf_counter()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


# --- the contenders ----------------------------------------------------------


def our_trainer(model, tokenizer, examples: list[Example], hp: ResolvedHyperparameters):
    """kubetune's trainer core (TRL's SFTTrainer as the recipe configures it)."""
    args = sft_arguments(
        hp,
        output_dir=Path(tempfile.mkdtemp()),
        on_cpu=not torch.cuda.is_available(),
        has_eval=False,
        collective_timeout_seconds=600,
        fsdp={},
    )
    return build_trainer(
        model,
        tokenizer,
        args,
        train=examples,
        evaluation=[],
        callbacks=[],
        keep_fp32_adapters=hp.precision.value != "bf16",
    )


def kubetune(
    folder: Path,
    examples: list[Example],
    batch: int,
    strategy: str,
    precision: str,
    attention: str,
) -> float:
    model, tokenizer = lora_model(folder, precision=precision, attention=attention)
    hp = hyperparameters(batch, strategy, precision=precision, attnImplementation=attention)
    return timed_train(our_trainer(model, tokenizer, examples, hp))


def trl(folder: Path, examples: list[Example], batch: int, packing: str, bf16: bool) -> float:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = lora_model(folder, precision="bf16" if bf16 else "fp32")
    dataset = Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )
    settings = (
        {"padding_free": True, "max_length": None}
        if packing == "padding_free"
        else {"packing": True, "packing_strategy": "bfd", "max_length": 512}
    )
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,  # TRL's default, also on CPUs
        seed=0,
        disable_tqdm=True,
        activation_checkpointing=False,  # TRL's default is on: its fastest setting is off
        **settings,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return timed_train(trainer)


def transformers_trainer(folder: Path, examples: list[Example], batch: int, grouped: bool):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer = lora_model(folder, precision="fp32")  # the Trainer's default
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if grouped else "random",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"),
    )
    return timed_train(trainer)


# --- FLOP rates --------------------------------------------------------------


def gemm_flops_per_second(size: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def training_flops(folder: Path, examples: list[Example]) -> float:
    """Useful operations of one LoRA epoch: forward 2 per parameter per token plus
    attention over each example alone, and a backward through the activations of
    about the same again (the frozen base needs no weight gradients)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    parameters = sum(p.numel() for p in lora_model(folder)[0].parameters())
    cost = acceleration.CostModel.of(parameters, config.hidden_size, config.num_hidden_layers)
    forward = sum(len(e) * cost.per_token + len(e) ** 2 * cost.per_score / 2 for e in examples)
    return 2 * forward


def throughput(kind: str, count: int, batch: int, repeats: int = 1) -> None:
    folder = model_folder(kind)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    examples = skewed_examples(count, vocab)
    tokens = sum(len(e) for e in examples)
    lengths = sorted(len(e) for e in examples)
    model, _ = lora_model(folder)
    shape = (sum(p.numel() for p in model.parameters()), model.config.hidden_size)
    attention = auto_attention()
    choice = acceleration.choose_packing(
        packing=True,
        requested=PackingStrategy.AUTO,
        method=FineTuningMethod.LORA,
        attention=AttentionImplementation(attention),
        lengths=[len(e) for e in examples],
        batch_size=batch,
        cost=acceleration.CostModel.of(shape[0], shape[1], model.config.num_hidden_layers),
        isolation_checked=True,
    )
    del model
    auto = choice.value.value
    precision = auto_precision(folder)
    other = "padding_free" if auto == "padded" else "padded"
    print(
        f"\n{kind}: {shape[0] / 1e6:.1f}M parameters, {count} examples of {lengths[0]}-"
        f"{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), {tokens} real tokens, "
        f"batch {batch}, LoRA r16 on all linear layers, {torch.get_num_threads()} threads"
    )
    print(f"  auto: {choice.reason}; precision {precision}; attention {attention}")
    # Warm up the process (allocator, thread pool, kernels) before timing anyone.
    kubetune(folder, examples[: batch * 2], batch, auto, precision, attention)
    best = f"kubetune (auto: {auto}, {attention}, {precision})"
    runs = {
        best: lambda: kubetune(folder, examples, batch, auto, precision, attention),
        f"kubetune ({auto}, {attention}, fp32)": lambda: kubetune(
            folder, examples, batch, auto, "fp32", attention
        ),
        f"kubetune ({auto}, sdpa, {precision})": lambda: kubetune(
            folder, examples, batch, auto, precision, "sdpa"
        ),
        f"kubetune ({other}, sdpa, {precision})": lambda: kubetune(
            folder, examples, batch, other, precision, "sdpa"
        ),
        "TRL SFTTrainer, padding_free, bf16": lambda: trl(
            folder, examples, batch, "padding_free", True
        ),
        "TRL SFTTrainer, padding_free, fp32": lambda: trl(
            folder, examples, batch, "padding_free", False
        ),
        "TRL SFTTrainer, BFD packing, bf16": lambda: trl(folder, examples, batch, "bfd", True),
        "transformers Trainer, group_by_length": lambda: transformers_trainer(
            folder, examples, batch, grouped=True
        ),
        "transformers Trainer, default": lambda: transformers_trainer(
            folder, examples, batch, grouped=False
        ),
    }
    rates = {}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds = run()
            rates[name] = max(rates.get(name, 0.0), tokens / seconds)
            gc.collect()
    ours = rates[best]
    useful = training_flops(folder, examples)
    print(f"  {'trainer':40s} {'real tokens/s':>14s} {'kubetune vs it':>15s}")
    for name, rate in rates.items():
        print(f"  {name:40s} {rate:14.0f} {ours / rate:14.2f}x")
    for label, name in (
        (precision, best),
        ("fp32", f"kubetune ({auto}, {attention}, fp32)"),
    ):
        gemm = gemm_flops_per_second(dtype=torch.bfloat16 if label == "bf16" else torch.float32)
        achieved = useful * rates[name] / tokens
        print(
            f"  training FLOP rate ({label}) {achieved / 1e9:.1f} GFLOP/s = "
            f"{achieved / gemm:.0%} of a 2048^3 {label} GEMM ({gemm / 1e9:.1f} GFLOP/s)"
        )
        if label == "fp32":
            break


# --- memory per method -------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(kind: str, method: str, steps: int) -> dict:
    folder = model_folder(kind)
    attention = auto_attention(method)
    model, tokenizer = lora_model(folder, method, attention=attention)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    batch = 2
    examples = [Example(list(range(5, 261)), list(range(5, 261)))] * (batch * steps)
    strategy = "padded" if method in ("PREFIX_TUNING", "PROMPT_TUNING") else "padding_free"
    precision = auto_precision(folder, method)
    hp = hyperparameters(
        batch, strategy, maxSteps=steps, precision=precision, attnImplementation=attention
    )
    trainer = our_trainer(model, tokenizer, examples, hp)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what loading freed (QLoRA's fp32 copy)
    loaded_rss = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure training only
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = timed_train(trainer)
    result = {
        "method": method,
        "parameters": total,
        "trainable": trainable,
        "loaded_rss_mib": loaded_rss / 1024,
        "train_peak_rss_mib": _rss_kib("VmHWM") / 1024,
        "seconds_per_step": seconds / steps,
    }
    if torch.cuda.is_available():
        result["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def memory(kind: str, steps: int) -> None:
    print(f"\nmemory ({kind}): batch 2 x 256 tokens, {steps} steps per method, own process each")
    for method in METHODS:
        output = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-child",
                    method,
                    "--model",
                    kind,
                    "--steps",
                    str(steps),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        row = json.loads(output)
        gpu = (
            f"  GPU peak {row['gpu_peak_allocated_mib']:.0f} MiB"
            if "gpu_peak_allocated_mib" in row
            else ""
        )
        print(
            f"  {method:14s} trainable {row['trainable'] / 1e6:8.3f}M of "
            f"{row['parameters'] / 1e6:6.1f}M  loaded RSS {row['loaded_rss_mib']:6.0f} MiB  "
            f"training peak RSS {row['train_peak_rss_mib']:6.0f} MiB  "
            f"{row['seconds_per_step']:5.2f} s/step{gpu}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "tiny", "both"], default="both")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=1, help="Run every contender this many times; keep the best."
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="Training steps per method (memory).")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_child:
        print(json.dumps(memory_child(args.model, args.memory_child, args.steps)))
        return
    kinds = ["smollm2", "tiny"] if args.model == "both" else [args.model]
    for kind in kinds:
        throughput(kind, args.examples, args.batch_size, args.repeats)
    if not args.skip_memory:
        memory("smollm2" if "smollm2" in kinds else kinds[0], args.steps)


if __name__ == "__main__":
    main()
