"""What "auto" resolves to."""

from __future__ import annotations

import pytest

from kubetune.api.defaults import gpu_memory_gib, resolve_hyperparameters
from kubetune.api.finetuningjob import FineTuningJobSpec

BASE = {
    "baseModel": {"name": "org/m", "revision": "abc"},
    "dataset": {"format": "JSONL", "volume": {"claimName": "d"}},
    "output": {"volume": {"claimName": "o"}},
}


def spec(method="LORA", **extra) -> FineTuningJobSpec:
    return FineTuningJobSpec.model_validate({**BASE, "method": method, **extra})


@pytest.mark.parametrize(
    ("method", "lr"), [("FULL", 2e-5), ("LORA", 2e-4), ("QLORA", 2e-4), ("PROMPT_TUNING", 1e-2)]
)
def test_learning_rate_by_method(method, lr) -> None:
    assert resolve_hyperparameters(spec(method)).learning_rate == lr


def test_explicit_values_win() -> None:
    resolved = resolve_hyperparameters(
        spec(
            hyperparameters={
                "epochs": 5,
                "batchSize": 3,
                "gradientAccumulationSteps": 2,
                "learningRate": 0.1,
            }
        )
    )
    assert (
        resolved.epochs,
        resolved.batch_size,
        resolved.gradient_accumulation_steps,
        resolved.learning_rate,
    ) == (5, 3, 2, 0.1)
    assert resolved.effective_batch_size == 6


def test_auto_batch_grows_with_gpu_memory_and_shrinks_for_full_fine_tuning() -> None:
    small = resolve_hyperparameters(spec(resources={"gpuType": "Tesla-T4"})).batch_size
    large = resolve_hyperparameters(spec(resources={"gpuType": "NVIDIA-H100-80GB-HBM3"})).batch_size
    full = resolve_hyperparameters(
        spec("FULL", resources={"gpuType": "NVIDIA-H100-80GB-HBM3"})
    ).batch_size
    assert small < large
    assert full < large


def test_auto_accumulation_reaches_an_effective_batch_of_16() -> None:
    resolved = resolve_hyperparameters(
        spec(resources={"gpus": 1}, hyperparameters={"batchSize": 4})
    )
    assert resolved.gradient_accumulation_steps == 4
    assert resolved.effective_batch_size == 16


def test_precision() -> None:
    assert resolve_hyperparameters(spec(resources={"gpus": 0})).precision == "fp32"
    assert resolve_hyperparameters(spec(resources={"gpuType": "Tesla-T4"})).precision == "fp16"
    assert (
        resolve_hyperparameters(spec(resources={"gpuType": "NVIDIA-A100-SXM4-80GB"})).precision
        == "bf16"
    )


def test_gpu_memory_table() -> None:
    assert gpu_memory_gib("NVIDIA-A100-SXM4-80GB") == 80
    assert gpu_memory_gib("NVIDIA-A100-SXM4-40GB") == 40
    assert gpu_memory_gib("NVIDIA-L4") == 24
    assert gpu_memory_gib(None) == 16
