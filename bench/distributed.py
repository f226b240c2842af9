"""Scaling of the trainer over processes, run by hand (`make bench`), not a test.

The same job (LoRA r16 on SmolLM2-135M-Instruct, or the tiny test model, text
rows of skewed lengths) through the trainer's command line: one process, then
torchrun with two (DDP over gloo on CPUs, NCCL on GPUs). On CPUs both runs get
the same cores (one process with all threads, or the threads split), so the
efficiency says what a second process costs or gains on this machine; on a
multi-GPU machine each process gets a GPU and the FLOP rate is reported as a
fraction of the GPU's dense bf16 peak (MFU).

    python bench/distributed.py [--model smollm2|tiny] [--rows 256] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "trainer_image")]

from kubetune.api.trainer import TrainerConfig  # noqa: E402

WORDS = [
    *("the", "a", "model", "trains", "on", "data", "and", "learns", "to", "answer"),
    *("questions", "about", "cities", "rivers", "colors", "animals", "numbers", "with"),
    *("short", "long", "sentences", "that", "vary", "in", "length"),
]
# Dense bf16 peaks (no sparsity), for MFU on GPUs this bench may meet.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def model_folder(kind: str) -> Path:
    if kind == "smollm2":
        from kubetune.dev.models import smollm2

        return smollm2()
    from tests.unit.trainer.conftest import _cached_model

    return _cached_model("causal")


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            words = max(4, min(300, int(rng.lognormvariate(3.5, 0.8))))
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            handle.write(json.dumps({"text": text}) + "\n")


def config(work: Path, model: Path, name: str, processes: int, steps: int, batch: int) -> Path:
    gpus = _gpus()
    resources = {"gpus": min(gpus, processes)} if gpus else {"gpus": 0}
    distributed = {"processesPerNode": processes} if not gpus and processes > 1 else {}
    precision = "bf16" if gpus else "fp32"
    document = {
        "job": {"name": name, "namespace": "bench", "uid": name},
        "spec": {
            "baseModel": {"name": "bench", "volume": {"claimName": "m"}},
            "dataset": {
                "format": "JSONL",
                "volume": {"claimName": "d"},
                "validationSplit": 0.0,
            },
            "method": "LORA",
            "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
            "hyperparameters": {
                "maxSteps": steps,
                "batchSize": batch,
                "gradientAccumulationSteps": 1,
                "maxSeqLength": 512,
                "precision": precision,
                "gradientCheckpointing": False,
                "loggingSteps": steps,
                "saveSteps": 10**6,
            },
            "output": {"volume": {"claimName": "o"}},
            "resources": resources,
            "distributed": distributed,
        },
        "hyperparameters": {
            "epochs": 1,
            "maxSteps": steps,
            "batchSize": batch,
            "gradientAccumulationSteps": 1,
            "effectiveBatchSize": batch * processes,
            "worldSize": processes,
            "learningRate": 1e-4,
            "lrScheduler": "constant",
            "warmupRatio": 0.0,
            "weightDecay": 0.0,
            "maxGradNorm": 1.0,
            "maxSeqLength": 512,
            "packing": True,
            "precision": precision,
            "gradientCheckpointing": False,
            "saveSteps": 10**6,
            "loggingSteps": steps,
            "seed": 0,
        },
        "paths": {
            "baseModel": str(model),
            "dataset": str(work / "rows.jsonl"),
            "output": str(work / name),
        },
        "report": {"file": str(work / name / "report.json")},
    }
    path = work / f"{name}.json"
    path.write_text(TrainerConfig.model_validate(document).model_dump_json(by_alias=True))
    return path


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def run(path: Path, processes: int, threads: int) -> dict:
    trainer = ["-m", "kubetune_trainer", "--config", str(path)]
    trainer += ["--termination-log", str(path.with_suffix(".termination"))]
    command = [sys.executable, *trainer]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={processes}", *trainer]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "trainer_image")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(path.with_suffix(".termination").read_text())["result"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4, help="Per process.")
    args = parser.parse_args()
    model = model_folder(args.model)
    cores = os.cpu_count() or 1
    gpus = _gpus()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    write_rows(work / "rows.jsonl", args.rows)
    counts = [1, 2] if gpus < 2 else sorted({1, 2, gpus})
    print(
        f"{args.model}: LoRA r16, {args.rows} text rows of skewed lengths, {args.steps} steps, "
        f"batch {args.batch_size} per process, "
        + (f"{gpus} GPUs" if gpus else f"{cores} CPU cores shared by the processes")
    )
    results = {}
    for processes in counts:
        threads = max(1, cores // processes) if not gpus else 1
        result = run(
            config(work, model, f"p{processes}", processes, args.steps, args.batch_size),
            processes,
            threads,
        )
        results[processes] = result["metrics"]["train_tokens_per_second"]
        used = result["hyperparameters"]
        print(
            f"  {processes} process(es) x {threads} thread(s): {results[processes]:8.0f} real "
            f"tokens/s  (world {used['worldSize']}, {used['distributedStrategy']}, "
            f"effective batch {used['effectiveBatchSize']}, packing {used['packingStrategy']})"
        )
    base = results[1]
    for processes, rate in results.items():
        if processes == 1:
            continue
        if gpus:
            print(f"  scaling efficiency x{processes}: {rate / (processes * base):.0%}")
        else:
            print(
                f"  {processes} processes on the same {cores} cores: {rate / base:.2f}x the "
                "single process (1.00x would be free distribution)"
            )
    if gpus:
        report_mfu(model, results)


def report_mfu(model: Path, results: dict[int, float]) -> None:
    import torch
    from kubetune_trainer.acceleration import CostModel
    from transformers import AutoConfig, AutoModelForCausalLM

    name = torch.cuda.get_device_name()
    peak = next((value for key, value in GPU_PEAK_BF16.items() if key in name), None)
    if peak is None:
        print(f"  MFU: no bf16 peak known for {name}")
        return
    config = AutoConfig.from_pretrained(model)
    parameters = AutoModelForCausalLM.from_pretrained(model).num_parameters()
    cost = CostModel.of(parameters, config.hidden_size, config.num_hidden_layers)
    for processes, rate in results.items():
        flops = 2 * rate * cost.per_token  # LoRA: a forward, and a backward through activations
        print(f"  MFU with {processes} GPU(s) ({name}): {flops / (processes * peak):.1%}")


if __name__ == "__main__":
    main()
