"""Where jobs run: a cluster (FineTuningJob resources) or this machine (a trainer process)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.evaluation import flat_metrics
from kubetune.sdk.cluster import TERMINAL_PHASES, Cluster, NotFound
from kubetune.sdk.config import (
    FineTuningConfig,
    cluster_locations,
    local_locations,
    to_job,
)
from kubetune.sdk.results import PHASE_STATUS, FineTuningResult

if TYPE_CHECKING:
    from kubetune.local import LocalRun

REGISTRY_RECORD = "registered-model.json"
CANCELLED_MARKER = "cancelled"
TRAINER_LOG = "trainer.log"
STOP_GRACE_SECONDS = 60


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- cluster -------------------------------------------------------------------------------


class ClusterBackend:
    """Jobs as FineTuningJob resources, run by the operator."""

    name = "cluster"

    def __init__(self, kubeconfig: str | Path | None = None, namespace: str | None = None):
        self.cluster = Cluster(kubeconfig, namespace)
        self.namespace = self.cluster.namespace
        self._cancelled: set[str] = set()

    def submit(self, config: FineTuningConfig, job_id: str) -> FineTuningResult:
        job = to_job(config, job_id, cluster_locations(config, job_id), namespace=self.namespace)
        obj = self.cluster.create_job(job)
        result = self.result(obj)
        result.status = "created"
        return result

    def result(self, obj: dict[str, Any]) -> FineTuningResult:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        name = meta["name"]
        phase = status.get("phase") or "Pending"
        state = PHASE_STATUS.get(phase, "running")
        if name in self._cancelled or (spec.get("cancel") and phase not in TERMINAL_PHASES):
            state = "cancelled"
        progress = status.get("progress") or {}
        failure = status.get("failure")
        output = ((spec.get("output") or {}).get("volume")) or {}
        return FineTuningResult(
            job_id=name,
            model_id=(meta.get("annotations") or {}).get("kubetune.dev/sdk-model-id")
            or spec.get("baseModel", {}).get("name", ""),
            fine_tuned_model_id=status.get("registeredModel"),
            status=state,
            start_time=_parse_time(status.get("startTime") or meta.get("creationTimestamp")),
            end_time=_parse_time(status.get("completionTime")),
            metrics=status.get("metrics") or {},
            evaluation=status.get("evaluation"),
            error=f"{failure['reason']}: {failure['message']}" if failure else None,
            step=progress.get("step", 0),
            total_steps=progress.get("totalSteps", 0),
            loss=progress.get("loss"),
            eta_seconds=progress.get("etaSeconds"),
            backend="cluster",
            phase=phase,
            namespace=self.namespace,
            output_dir=f"pvc://{output.get('claimName')}/{output.get('path', '')}"
            if output
            else None,
        )

    def refresh(self, job_id: str) -> FineTuningResult:
        return self.result(self.cluster.get_job(job_id))

    def cancel(self, job_id: str) -> bool:
        obj = self.cluster.get_job(job_id)
        if (obj.get("status") or {}).get("phase") in TERMINAL_PHASES:
            return (obj.get("status") or {}).get("phase") == "Cancelled"
        self.cluster.cancel_job(job_id)
        self._cancelled.add(job_id)
        return True

    def wait(self, job_id: str, timeout: float | None) -> FineTuningResult:
        def finished(obj: dict[str, Any]) -> bool:
            return (obj.get("status") or {}).get("phase") in TERMINAL_PHASES

        return self.result(self.cluster.wait_job(job_id, finished, timeout))

    def register(self, job_id: str, result: FineTuningResult, timeout: float = 60) -> str:
        if result.fine_tuned_model_id:
            return result.fine_tuned_model_id
        obj = self.cluster.get_job(job_id)
        if not ((obj.get("spec") or {}).get("registration") or {}).get("enabled", True):
            raise ValueError(f"job {job_id} has registration disabled (spec.registration)")

        def registered(o: dict[str, Any]) -> bool:
            status = o.get("status") or {}
            return bool(status.get("registeredModel")) or status.get("phase") == "Failed"

        obj = self.cluster.wait_job(job_id, registered, timeout)
        name = (obj.get("status") or {}).get("registeredModel")
        if not name:
            raise ValueError(f"job {job_id} was not registered: {self.result(obj).error}")
        self.cluster.get_model(name)
        return name


# --- local ---------------------------------------------------------------------------------


@dataclass
class LocalJob:
    job_id: str
    config: FineTuningConfig
    run: LocalRun
    process: subprocess.Popen
    started: datetime
    ended: datetime | None = None
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def output(self) -> Path:
        return self.run.output

    @property
    def report_file(self) -> Path:
        return self.run.report_file

    @property
    def termination_file(self) -> Path:
        return self.run.termination_file


class LocalBackend:
    """Jobs as trainer processes on this machine (`python -m kubetune_trainer`)."""

    name = "local"

    def __init__(self, gpus: int | None = None):
        self.gpus = gpus
        self.jobs: dict[str, LocalJob] = {}

    def submit(self, config: FineTuningConfig, job_id: str) -> FineTuningResult:
        from kubetune.local import CONFIG_FILE, LocalRunError, build_local_run, trainer_environment

        locations = local_locations(config, job_id)
        job = to_job(config, job_id, locations)
        try:
            run = build_local_run(job, locations.local_volumes, gpus=self.gpus)
        except LocalRunError as err:
            raise ValueError(str(err)) from None
        run.output.mkdir(parents=True, exist_ok=True)
        config_file = run.output / CONFIG_FILE
        config_file.write_text(
            json.dumps(run.config.model_dump(mode="json", by_alias=True, exclude_none=True)),
            encoding="utf-8",
        )
        (run.output / "sdk-config.json").write_text(
            json.dumps({"model_id": config.model_id, "job_id": job_id}), encoding="utf-8"
        )
        command = [
            sys.executable,
            "-m",
            "kubetune_trainer",
            "--config",
            str(config_file),
            "--mode",
            "train",
            "--termination-log",
            str(run.termination_file),
        ]
        with (run.output / TRAINER_LOG).open("wb") as log:
            process = subprocess.Popen(
                command,
                env=trainer_environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the caller does not reach it
            )
        self.jobs[job_id] = LocalJob(job_id, config, run, process, datetime.now(UTC))
        return FineTuningResult(
            job_id=job_id,
            model_id=config.model_id,
            status="created",
            start_time=self.jobs[job_id].started,
            backend="local",
            output_dir=str(run.output),
        )

    def _job(self, job_id: str) -> LocalJob:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"local job {job_id!r} not found") from None

    def refresh(self, job_id: str) -> FineTuningResult:
        from kubetune.api.trainer import TrainerTermination
        from kubetune.local import read_progress

        job = self._job(job_id)
        code = job.process.poll()
        if code is not None and job.ended is None:
            job.ended = datetime.now(UTC)
        result = FineTuningResult(
            job_id=job_id,
            model_id=job.config.model_id,
            status="running",
            start_time=job.started,
            end_time=job.ended,
            backend="local",
            output_dir=str(job.output),
        )
        progress = read_progress(job.report_file) or {}
        result.step = progress.get("step", 0)
        result.total_steps = progress.get("totalSteps", 0)
        result.loss = progress.get("loss")
        result.eta_seconds = progress.get("etaSeconds")
        record = job.output / REGISTRY_RECORD
        if record.is_file():
            result.fine_tuned_model_id = json.loads(record.read_text(encoding="utf-8"))["id"]
        if job.cancelled:
            result.status = "cancelled"
            return result
        if code is None:
            return result
        termination = None
        if job.termination_file.is_file() and job.termination_file.read_text().strip():
            termination = TrainerTermination.model_validate_json(job.termination_file.read_text())
        if code == 0 and termination and termination.result:
            result.status = "completed"
            result.metrics = dict(termination.result.metrics)
            result.evaluation = termination.result.evaluation
            if result.evaluation is not None and not result.evaluation.error:
                result.metrics.update(flat_metrics(result.evaluation))
        else:
            result.status = "failed"
            if termination and termination.error:
                result.error = f"{termination.error.reason}: {termination.error.message}"
            else:
                result.error = f"the trainer stopped with exit code {code} (see {TRAINER_LOG})"
        return result

    def cancel(self, job_id: str) -> bool:
        job = self._job(job_id)
        with job.lock:
            if job.process.poll() is not None:
                return job.cancelled
            job.cancelled = True
            (job.output / CANCELLED_MARKER).write_text(datetime.now(UTC).isoformat())
            job.process.send_signal(signal.SIGTERM)  # the trainer checkpoints and stops
            try:
                job.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()
        job.ended = datetime.now(UTC)
        return True

    def wait(self, job_id: str, timeout: float | None) -> FineTuningResult:
        job = self._job(job_id)
        try:
            job.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"job {job_id} still runs after {timeout}s") from None
        return self.refresh(job_id)

    def register(self, job_id: str, result: FineTuningResult) -> str:
        """A registry record beside the model (registered-model.json); the same id each time."""
        from kubetune.api.trainer import TrainerTermination

        job = self._job(job_id)
        record = job.output / REGISTRY_RECORD
        with job.lock:
            if record.is_file():
                return json.loads(record.read_text(encoding="utf-8"))["id"]
            termination = TrainerTermination.model_validate_json(job.termination_file.read_text())
            artifact = termination.result.artifact
            document = {
                "id": job_id,
                "baseModel": job.config.model_id,
                "method": job.config.method.value,
                "artifact": {
                    "path": str(job.output / artifact.path),
                    "kind": artifact.kind,
                    "digest": artifact.digest,
                    "mergedPath": str(job.output / artifact.merged_path)
                    if artifact.merged_path
                    else None,
                },
                "datasetDigest": termination.result.dataset_digest,
                "metrics": termination.result.metrics,
                "sourceJob": job_id,
                "trainedAt": termination.result.completed_at.isoformat(),
                "registeredAt": datetime.now(UTC).isoformat(),
            }
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(document, indent=2), encoding="utf-8")
            tmp.replace(record)
        return job_id
