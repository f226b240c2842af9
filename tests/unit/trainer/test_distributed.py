"""Several processes (torchrun, gloo on CPU) train what one process with the whole
batch trains: DDP for LoRA, FSDP2 for FULL; a killed rank or a SIGTERM resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import make_config, write_config

ROOT = Path(__file__).resolve().parents[3]
LORA = {"lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}


def config_file(tmp_path, model_dir, name, *, method="LORA", processes=1, strategy="auto", **hp):
    spec = {
        **(LORA if method == "LORA" else {}),
        "resources": {"gpus": 0},
        "distributed": {"strategy": strategy}
        | ({"processesPerNode": processes} if processes > 1 else {}),
    }
    hyperparameters = {
        "maxSteps": 6,
        "learningRate": 1e-2 if method == "LORA" else 1e-3,
        "evalSteps": 3,
        **hp,
    }
    hyperparameters["effectiveBatchSize"] = (
        hyperparameters.get("batchSize", 4)
        * hyperparameters.get("gradientAccumulationSteps", 2)
        * processes
    )
    config = make_config(
        tmp_path,
        model_dir,
        method=method,
        spec=spec,
        output=tmp_path / name,
        hyperparameters=hyperparameters,
    )
    return write_config(config, tmp_path / f"{name}.json"), tmp_path / name


def command(config: Path, processes: int) -> list[str]:
    trainer = ["-m", "kubetune_trainer", "--config", str(config)]
    trainer += ["--termination-log", str(config.with_suffix(".termination"))]
    if processes == 1:
        return [sys.executable, *trainer]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc-per-node={processes}", *trainer]


def environment(processes: int) -> dict[str, str]:
    # torchrun would give each process one thread anyway; one process gets both cores.
    threads = "2" if processes == 1 else "1"
    path = os.pathsep.join([str(ROOT), str(ROOT / "trainer_image")])
    return {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": path}


def train(config: Path, processes: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(config, processes),
        env=environment(processes),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def losses(output: Path) -> list[float]:
    return [loss for _, loss in json.loads((output / "metrics.json").read_text())["loss_history"]]


def weights(output: Path) -> dict[str, torch.Tensor]:
    folder = output / "model"
    name = (
        "adapter_model.safetensors"
        if (folder / "adapter_model.safetensors").exists()
        else ("model.safetensors")
    )
    return load_file(str(folder / name))


def assert_same_training(one: Path, many: Path) -> None:
    assert losses(many) == pytest.approx(losses(one), abs=1e-5)
    first, second = weights(one), weights(many)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, atol=1e-5, rtol=0, msg=name)


def result_of(config: Path) -> dict:
    return json.loads(config.with_suffix(".termination").read_text())["result"]


@pytest.mark.parametrize(
    ("method", "strategy", "batch", "accumulation"),
    [
        ("LORA", "auto", 4, 2),  # DDP: 2 processes x 4 x 2 == 1 x 8 x 2
        ("LORA", "auto", 2, 4),  # accumulation x world size: 2 x 2 x 4 == 1 x 8 x 2
        ("FULL", "fsdp", 4, 2),  # FSDP2
    ],
)
def test_two_processes_train_what_one_process_trains_with_the_whole_batch(
    tmp_path, tiny_model_dir, method, strategy, batch, accumulation
):
    one, one_out = config_file(
        tmp_path, tiny_model_dir, "one", method=method, batchSize=8, gradientAccumulationSteps=2
    )
    many, many_out = config_file(
        tmp_path,
        tiny_model_dir,
        "many",
        method=method,
        processes=2,
        strategy=strategy,
        batchSize=batch,
        gradientAccumulationSteps=accumulation,
    )
    for config, processes in ((one, 1), (many, 2)):
        finished = train(config, processes)
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_training(one_out, many_out)
    used = result_of(many)["hyperparameters"]
    expected = "fsdp" if method == "FULL" else "ddp"
    assert (used["worldSize"], used["distributedStrategy"]) == (2, expected)
    assert used["effectiveBatchSize"] == batch * accumulation * 2 == 16
    # Evaluation is gathered over both processes: the same held-out loss.
    assert result_of(many)["metrics"]["eval_loss"] == pytest.approx(
        result_of(one)["metrics"]["eval_loss"], abs=1e-5
    )


def _wait_for_checkpoint(output: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((output / "checkpoints").glob("checkpoint-*/kubetune-checkpoint.json")):
            return
        assert process.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.01)
    raise AssertionError("no checkpoint in time")


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(p) for p in found]


@pytest.mark.parametrize(
    ("method", "strategy", "stop"),
    [
        ("FULL", "fsdp", "kill-one-rank"),  # a crashed process: the attempt fails
        ("LORA", "auto", "sigterm"),  # pod deletion or preemption: checkpoint, then stop
    ],
)
def test_an_interrupted_run_resumes_exactly(tmp_path, tiny_model_dir, method, strategy, stop):
    settings = {
        "method": method,
        "processes": 2,
        "strategy": strategy,
        "maxSteps": 60,
        "saveSteps": 10,
        # A stop between logs logs early; log every step so both runs log the same steps.
        "loggingSteps": 5 if stop == "kill-one-rank" else 1,
        "evalSteps": 20,
    }
    straight, straight_out = config_file(tmp_path, tiny_model_dir, "straight", **settings)
    assert train(straight, 2).returncode == 0
    interrupted, output = config_file(tmp_path, tiny_model_dir, "interrupted", **settings)
    launcher = subprocess.Popen(
        command(interrupted, 2),
        env=environment(2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_checkpoint(output, launcher)
        if stop == "kill-one-rank":
            os.kill(_children(launcher.pid)[-1], signal.SIGKILL)
        else:
            os.kill(launcher.pid, signal.SIGTERM)  # torchrun passes it to every process
        _, stderr = launcher.communicate(timeout=120)  # nobody hangs
        assert launcher.returncode != 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert not (output / "model").exists()
    if stop == "sigterm":
        assert stderr.count("the next run resumes") == 2  # both processes saved and stopped
    resumed = train(interrupted, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert_same_training(straight_out, output)
