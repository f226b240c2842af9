"""Trainer throughput and memory, run by hand (not a test).

1. Real (non-padding) tokens per second of the kubetune trainer (padding-free
   packing, length-grouped batches) against a plain Hugging Face Trainer with
   its default padding collator and sampler, on the same model and the same
   examples with skewed lengths, in the same process.
2. Peak memory of each method (FULL, LORA, QLORA, PREFIX_TUNING, PROMPT_TUNING)
   on a ~100M-parameter Llama-style model: each method runs in its own process;
   on CPU the figure is the peak resident set size while training (VmHWM reset
   after loading), on GPU torch's peak allocated memory.

    PYTHONPATH=.:trainer_image python bench/trainer_throughput.py [--steps 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from kubetune_trainer import modeling
from kubetune_trainer.encoding import Example
from kubetune_trainer.training import Trainer

from kubetune.api.finetuningjob import FineTuningJobSpec, ResolvedHyperparameters

CACHE = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune")) / "bench-models"
METHODS = ["FULL", "LORA", "QLORA", "PREFIX_TUNING", "PROMPT_TUNING"]


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


def hyperparameters(batch_size: int, **overrides) -> ResolvedHyperparameters:
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
        "precision": "fp32",
        "gradientCheckpointing": False,
        "saveSteps": 10**6,
        "loggingSteps": 10**6,
        "seed": 0,
        **overrides,
    }
    return ResolvedHyperparameters.model_validate(values)


def build_model(folder: Path, hidden: int, layers: int, intermediate: int, heads: int) -> Path:
    from kubetune_trainer.tiny import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    staging = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None))
    LlamaForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(folder)
    return folder


# --- 1. throughput -----------------------------------------------------------


def ours(model_dir: Path, examples: list[Example], batch_size: int) -> float:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    trainer = Trainer(
        model=model,
        train_examples=examples,
        eval_examples=[],
        hyperparameters=hyperparameters(batch_size),
        packed=True,
        pad_token_id=0,
        device=torch.device("cpu"),
        autocast_dtype=None,
        checkpoint_dir=Path(tempfile.mkdtemp()) / "checkpoints",
    )
    started = time.perf_counter()
    state = trainer.fit()
    return state.real_tokens / (time.perf_counter() - started)


def hugging_face(model_dir: Path, examples: list[Example], batch_size: int) -> float:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        TrainingArguments,
    )
    from transformers import (
        Trainer as HFTrainer,
    )

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = HFTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"),
    )
    started = time.perf_counter()
    trainer.train()
    return sum(len(e) for e in examples) / (time.perf_counter() - started)


# --- 2. memory per method ----------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(model_dir: Path, method: str, steps: int) -> dict:
    spec_doc = {
        "baseModel": {"name": "bench", "volume": {"claimName": "m"}},
        "dataset": {"format": "JSONL", "volume": {"claimName": "d"}},
        "method": method,
        "output": {"volume": {"claimName": "o"}},
    }
    if method == "QLORA":
        spec_doc["quantization"] = {"computeDtype": "float32"}
    spec = FineTuningJobSpec.model_validate(spec_doc)
    device = modeling.pick_device()
    source = modeling.ModelSource(str(model_dir), None, None, False, None)
    model = modeling.load_base_model(source, spec, modeling.Precision.FP32, device)
    model = modeling.apply_method(model, spec, source, gradient_checkpointing=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    batch = 2
    examples = [Example(list(range(5, 261)), list(range(5, 261)))] * (batch * steps)
    packed = method not in ("PREFIX_TUNING", "PROMPT_TUNING")
    trainer = Trainer(
        model=model,
        train_examples=examples,
        eval_examples=[],
        hyperparameters=hyperparameters(batch),
        packed=packed,
        pad_token_id=0,
        device=device,
        autocast_dtype=None,
        checkpoint_dir=Path(tempfile.mkdtemp()) / "checkpoints",
        virtual_tokens=modeling.num_virtual_tokens(model),
    )
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what loading freed (e.g. QLoRA's fp32 copy)
    loaded_rss = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure training only
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.fit()
    result = {
        "method": method,
        "parameters": total,
        "trainable": trainable,
        "loaded_rss_mib": loaded_rss / 1024,
        "train_peak_rss_mib": _rss_kib("VmHWM") / 1024,
        "lifetime_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds_per_step": (time.perf_counter() - started) / steps,
    }
    if device.type == "cuda":
        result["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="Training steps per method (memory).")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    big = build_model(CACHE / "llama-100m-v1", hidden=768, layers=16, intermediate=2048, heads=12)
    if args.memory_child:
        print(json.dumps(memory_child(big, args.memory_child, args.steps)))
        return

    small = build_model(CACHE / "llama-small-v1", hidden=256, layers=4, intermediate=688, heads=4)
    examples = skewed_examples(args.examples, vocab=900)
    lengths = sorted(len(e) for e in examples)
    print(
        f"throughput: {len(examples)} examples, lengths min {lengths[0]} median "
        f"{lengths[len(lengths) // 2]} max {lengths[-1]}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    hf = hugging_face(small, examples, args.batch_size)
    kt = ours(small, examples, args.batch_size)
    print(f"  Hugging Face Trainer (padding):         {hf:9.0f} real tokens/s")
    print(f"  kubetune trainer (packed, grouped):     {kt:9.0f} real tokens/s")
    print(f"  ratio: {kt / hf:.2f}x")
    if args.skip_memory:
        return
    print(f"memory: ~100M-parameter model, batch 2 x 256 tokens, {args.steps} steps per method")
    for method in METHODS:
        output = (
            subprocess.run(
                [sys.executable, __file__, "--memory-child", method, "--steps", str(args.steps)],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        row = json.loads(output)
        gpu = (
            f"  gpu peak {row['gpu_peak_allocated_mib']:.0f} MiB"
            if "gpu_peak_allocated_mib" in row
            else ""
        )
        print(
            f"  {method:14s} params {row['parameters'] / 1e6:6.1f}M trainable "
            f"{row['trainable'] / 1e6:8.3f}M  loaded RSS {row['loaded_rss_mib']:6.0f} MiB  "
            f"training peak RSS {row['train_peak_rss_mib']:6.0f} MiB  "
            f"{row['seconds_per_step']:5.1f} s/step{gpu}"
        )


if __name__ == "__main__":
    main()
