"""Local training: run the trainer on this machine from a FineTuningJob manifest.

`kubetune train -f job.yaml --local` builds the same TrainerConfig the operator
would, with each PersistentVolumeClaim mapped to a local folder, and runs
`python -m kubetune_trainer` with a progress bar read from its report file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.api import FineTuningJob
from kubetune.api.common import VolumeLocation
from kubetune.api.defaults import resolve_hyperparameters
from kubetune.api.finetuningjob import FILE_FORMATS
from kubetune.api.trainer import (
    REPORT_PROGRESS_KEY,
    JobIdentity,
    ReportTarget,
    TrainerConfig,
    TrainerPaths,
    TrainerTermination,
)

REPORT_FILE = "local-report.json"
TERMINATION_FILE = "termination-log"
CONFIG_FILE = "local-trainer-config.json"
POLL_SECONDS = 0.5


class LocalRunError(Exception):
    """A problem with the manifest or the local folders, worded for the user."""


def load_manifest(path: str | Path) -> FineTuningJob:
    """The FineTuningJob of a manifest file, with pydantic errors as `field: message` lines."""
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except OSError as err:
        raise LocalRunError(f"cannot read {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise LocalRunError(f"{path} is not valid YAML: {err}") from err
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "FineTuningJob"]
    if len(jobs) != 1:
        raise LocalRunError(f"{path} must hold exactly one FineTuningJob, found {len(jobs)}")
    try:
        return FineTuningJob.model_validate(jobs[0])
    except ValidationError as err:
        lines = [
            f"  {'.'.join(str(p) for p in item['loc']) or '(root)'}: {item['msg']}"
            for item in err.errors()
        ]
        raise LocalRunError(f"{path} is not a valid FineTuningJob:\n" + "\n".join(lines)) from err


def parse_volumes(pairs: tuple[str, ...] | list[str]) -> dict[str, Path]:
    volumes = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise LocalRunError(f"--volume {pair!r} must be NAME=DIR")
        volumes[name] = Path(folder)
    return volumes


def local_gpus() -> int:
    """GPUs this machine can train on, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    return 1 if shutil.which("nvidia-smi") else 0


@dataclass
class LocalRun:
    config: TrainerConfig
    output: Path

    @property
    def report_file(self) -> Path:
        return self.output / REPORT_FILE

    @property
    def termination_file(self) -> Path:
        return self.output / TERMINATION_FILE


def build_local_run(
    job: FineTuningJob,
    volumes: dict[str, Path],
    output_dir: Path | None = None,
    gpus: int | None = None,
) -> LocalRun:
    """The TrainerConfig for a local run: claims mapped to folders (default ./<claimName>),
    hyperparameters resolved for this machine's GPUs."""
    spec = job.spec

    def locate(location: VolumeLocation, what: str, must_exist: bool = True) -> Path:
        root = volumes.get(location.claim_name, Path(location.claim_name))
        path = (root / location.path) if location.path else root
        if must_exist and not path.exists():
            raise LocalRunError(
                f"{what} {path} does not exist (claim {location.claim_name!r}; map it with "
                f"--volume {location.claim_name}=DIR)"
            )
        return path.resolve()

    base_model = locate(spec.base_model.volume, "base model") if spec.base_model.volume else None
    dataset = None
    if spec.dataset.volume is not None:
        dataset = locate(spec.dataset.volume, "dataset")
    elif spec.dataset.format in FILE_FORMATS:
        raise LocalRunError(f"dataset.volume is required for format {spec.dataset.format.value}")
    evaluation_data = spec.evaluation.data if spec.evaluation else None
    evaluation = None
    if evaluation_data is not None and evaluation_data.volume is not None:
        evaluation = locate(evaluation_data.volume, "evaluation data")
    output = (output_dir or locate(spec.output.volume, "output", must_exist=False)).resolve()
    local_gpu_count = local_gpus() if gpus is None else gpus
    # One process on this machine: the spec the trainer sees is what this machine runs.
    spec = spec.model_copy(
        update={
            "resources": spec.resources.model_copy(
                update={"gpus": min(spec.resources.gpus, local_gpu_count, 1), "nodes": 1}
            ),
            "distributed": spec.distributed.model_copy(update={"processes_per_node": None}),
        }
    )
    hyperparameters = resolve_hyperparameters(spec)
    metadata = job.metadata or {}
    config = TrainerConfig(
        job=JobIdentity(
            name=str(metadata.get("name", "local")),
            namespace=str(metadata.get("namespace", "default")),
        ),
        spec=spec,
        hyperparameters=hyperparameters,
        paths=TrainerPaths(
            base_model=str(base_model) if base_model else None,
            dataset=str(dataset) if dataset else None,
            evaluation=str(evaluation) if evaluation else None,
            output=str(output),
        ),
        report=ReportTarget(file=str(output / REPORT_FILE)),
    )
    return LocalRun(config=config, output=output)


def trainer_environment() -> dict[str, str]:
    """The environment for the trainer subprocess: the trainer package importable from a
    source checkout, and the current interpreter's path."""
    env = dict(os.environ)
    extra = [str(Path(__file__).resolve().parents[1])]
    source_tree = Path(__file__).resolve().parents[1] / "trainer_image"
    if (source_tree / "kubetune_trainer").is_dir():
        extra.append(str(source_tree))
    env["PYTHONPATH"] = os.pathsep.join([*extra, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def read_progress(report_file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(report_file.read_text(encoding="utf-8")).get(REPORT_PROGRESS_KEY)
    except (OSError, json.JSONDecodeError):
        return None


def run_local(
    run: LocalRun, *, mode: str = "train", show_progress: bool = True
) -> tuple[int, TrainerTermination | None]:
    """Run the trainer; returns its exit code and termination message."""
    run.output.mkdir(parents=True, exist_ok=True)
    for stale in (run.report_file, run.termination_file):
        stale.unlink(missing_ok=True)
    config_file = run.output / CONFIG_FILE
    config_file.write_text(
        json.dumps(run.config.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2),
        encoding="utf-8",
    )
    command = [
        sys.executable,
        "-m",
        "kubetune_trainer",
        "--config",
        str(config_file),
        "--mode",
        mode,
        "--termination-log",
        str(run.termination_file),
    ]
    process = subprocess.Popen(command, env=trainer_environment())
    try:
        if show_progress:
            _follow(process, run.report_file)
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()  # the trainer saves a checkpoint and stops
        code = process.wait()
    termination = None
    if run.termination_file.is_file():
        text = run.termination_file.read_text(encoding="utf-8")
        if text.strip():
            termination = TrainerTermination.model_validate_json(text)
    return code, termination


def _follow(process: subprocess.Popen, report_file: Path) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task("train", total=None, detail="")
        while process.poll() is None:
            _update(progress, task, report_file)
            time.sleep(POLL_SECONDS)
        _update(progress, task, report_file)


def _update(progress, task, report_file: Path) -> None:
    report = read_progress(report_file)
    if not report:
        return
    detail = f"loss {report['loss']:.4f}" if report.get("loss") is not None else ""
    if report.get("evalLoss") is not None:
        detail += f"  eval {report['evalLoss']:.4f}"
    if report.get("tokensPerSecond"):
        detail += f"  {report['tokensPerSecond']:.0f} tok/s"
    progress.update(task, completed=report["step"], total=report["totalSteps"], detail=detail)
