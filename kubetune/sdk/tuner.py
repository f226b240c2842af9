"""ModelFineTuner: create, follow, cancel and register fine-tuning jobs, on a cluster or locally;
sweeps and merges of registered models on a cluster."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from kubetune.api.common import VolumeLocation
from kubetune.api.merge import MergeFormat, MergeMethod
from kubetune.api.sweep import FineTuningSweep
from kubetune.sdk.backends import ClusterBackend, LocalBackend
from kubetune.sdk.cluster import NotFound, kubeconfig_available
from kubetune.sdk.config import DatasetFormat, FineTuningConfig, new_job_id
from kubetune.sdk.merges import MergeWeights, check_model_merge, merge_manifest
from kubetune.sdk.results import FineTuningResult

BackendName = Literal["local", "cluster"]


class ModelManager(Protocol):
    async def get_model(self, model_id: str) -> Any: ...


def default_backend_name() -> BackendName:
    """cluster when a kubeconfig is configured ($KUBECONFIG or ~/.kube/config), else local."""
    return "cluster" if kubeconfig_available() else "local"


def _trainer_module(name: str):
    """A module of the trainer package, from the installed package or this source tree."""
    try:
        return importlib.import_module(f"kubetune_trainer.{name}")
    except ImportError:
        source = Path(__file__).resolve().parents[2] / "trainer_image"
        if not (source / "kubetune_trainer").is_dir() or str(source) in sys.path:
            raise
        sys.path.append(str(source))
        return importlib.import_module(f"kubetune_trainer.{name}")


class ModelFineTuner:
    """Fine-tuning jobs behind one API; `backend` is "local", "cluster", a backend object,
    or None for the default (cluster when a kubeconfig is configured, else local)."""

    def __init__(
        self,
        model_manager: ModelManager | None = None,
        backend: BackendName | ClusterBackend | LocalBackend | None = None,
        *,
        kubeconfig: str | Path | None = None,
        namespace: str | None = None,
    ):
        self.model_manager = model_manager
        if backend is None:
            backend = "cluster" if kubeconfig else default_backend_name()
        if backend == "cluster":
            backend = ClusterBackend(kubeconfig, namespace)
        elif backend == "local":
            backend = LocalBackend()
        elif not isinstance(backend, ClusterBackend | LocalBackend):
            raise ValueError(f"backend must be 'local' or 'cluster', not {backend!r}")
        self.backend = backend
        self.jobs: dict[str, FineTuningResult] = {}

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # --- datasets ------------------------------------------------------------------------

    async def prepare_dataset(
        self,
        dataset_path: str | Path,
        dataset_format: DatasetFormat | str,
        output_format: DatasetFormat | str = DatasetFormat.JSONL,
        preprocessing_steps: Sequence[dict[str, Any] | Any] | None = None,
        *,
        fields: dict[str, str] | None = None,
    ) -> str:
        """Convert (JSONL, CSV, TEXT) and preprocess a dataset file with the trainer's pipeline;
        writes `prepared/<name>.<ext>` beside the input and returns its path."""
        source_format = DatasetFormat(str(getattr(dataset_format, "value", dataset_format)).lower())
        target_format = DatasetFormat(str(getattr(output_format, "value", output_format)).lower())
        for fmt in (source_format, target_format):
            if not fmt.is_file:
                raise ValueError(
                    f"prepare_dataset converts jsonl, csv and text files, not {fmt.value}"
                )
        source = Path(dataset_path).expanduser()
        if not source.is_file():
            raise ValueError(f"dataset file {dataset_path} does not exist")
        target = source.parent / "prepared" / f"{source.stem}.{target_format.extension}"
        data = _trainer_module("data")
        errors = _trainer_module("errors")

        def convert() -> None:
            try:
                data.convert(
                    source,
                    source_format.to_api(),
                    target,
                    target_format.to_api(),
                    list(preprocessing_steps or []),
                    fields=fields,
                )
            except errors.TrainerFailure as err:
                raise ValueError(f"{err.reason}: {err.message}") from None
            except Exception as err:  # pydantic errors on malformed steps
                if type(err).__name__ == "ValidationError":
                    raise ValueError(f"invalid preprocessing step: {err}") from None
                raise

        await asyncio.to_thread(convert)
        return str(target)

    # --- jobs ----------------------------------------------------------------------------

    async def create_fine_tuning_job(self, config: FineTuningConfig) -> str:
        """Start a job and return its id at once; training runs in the background."""
        if not isinstance(config, FineTuningConfig):
            raise ValueError("config must be a FineTuningConfig")
        if self.model_manager is not None:
            model = await self.model_manager.get_model(config.model_id)
            if not model:
                raise ValueError(f"Model {config.model_id} not found")
        job_id = new_job_id(config.model_id)
        while job_id in self.jobs:
            job_id = new_job_id(config.model_id)
        result = await asyncio.to_thread(self.backend.submit, config, job_id)
        self.jobs[job_id] = result
        return job_id

    def _keep(self, result: FineTuningResult) -> FineTuningResult:
        previous = self.jobs.get(result.job_id)
        if previous is not None and previous.status == "cancelled":
            result.status = "cancelled"  # cancelled stays cancelled
        self.jobs[result.job_id] = result
        return result

    async def get_fine_tuning_job(self, job_id: str) -> FineTuningResult | None:
        """The job's current state, or None if there is no such job."""
        if job_id not in self.jobs and isinstance(self.backend, LocalBackend):
            return None
        try:
            result = await asyncio.to_thread(self.backend.refresh, job_id)
        except NotFound:
            return None
        return self._keep(result)

    async def list_fine_tuning_jobs(
        self, model_id: str | None = None, status: str | None = None
    ) -> list[FineTuningResult]:
        """This tuner's jobs, refreshed, optionally by base model and status."""
        results = []
        for job_id in list(self.jobs):
            result = await self.get_fine_tuning_job(job_id) or self.jobs[job_id]
            if model_id is not None and result.model_id != model_id:
                continue
            if status is not None and result.status != str(getattr(status, "value", status)):
                continue
            results.append(result)
        return results

    async def cancel_fine_tuning_job(self, job_id: str) -> bool:
        """Stop training for good; the job's status stays "cancelled". False if it had ended."""
        if await self.get_fine_tuning_job(job_id) is None:
            return False
        if self.jobs[job_id].status == "cancelled":
            return True
        if self.jobs[job_id].done:
            return False
        cancelled = await asyncio.to_thread(self.backend.cancel, job_id)
        if cancelled:
            self.jobs[job_id].status = "cancelled"
            await self.get_fine_tuning_job(job_id)
        return cancelled

    async def wait_for_completion(
        self, job_id: str, timeout: float | None = None
    ) -> FineTuningResult:
        """Wait until the job completes, fails or is cancelled (TimeoutError after `timeout`)."""
        if await self.get_fine_tuning_job(job_id) is None:
            raise ValueError(f"job {job_id} not found")
        if self.jobs[job_id].done:
            return self.jobs[job_id]
        result = await asyncio.to_thread(self.backend.wait, job_id, timeout)
        return self._keep(result)

    async def register_fine_tuned_model(self, job_id: str) -> str:
        """The registered model's id (the same on every call); ValueError unless completed."""
        result = await self.get_fine_tuning_job(job_id)
        if result is None:
            raise ValueError(f"job {job_id} not found")
        if result.status != "completed":
            raise ValueError(f"job {job_id} is {result.status}, not completed: nothing to register")
        model_id = await asyncio.to_thread(self.backend.register, job_id, result)
        result.fine_tuned_model_id = model_id
        return model_id

    # --- sweeps and merges (cluster backend) ------------------------------------------------

    def _cluster(self):
        if not isinstance(self.backend, ClusterBackend):
            raise ValueError("sweeps and merges run on a cluster: use backend='cluster'")
        return self.backend.cluster

    async def create_sweep(self, sweep: dict[str, Any]) -> str:
        """Create a FineTuningSweep (a manifest as a dict); returns its name."""
        FineTuningSweep.model_validate(sweep)  # refused here with the field named
        created = await asyncio.to_thread(self._cluster().create_sweep, sweep)
        return created["metadata"]["name"]

    async def get_sweep(self, name: str) -> dict[str, Any]:
        """The sweep as stored: its spec and status (trial table, best trial, phase)."""
        return await asyncio.to_thread(self._cluster().get_sweep, name)

    async def wait_for_sweep(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the sweep succeeded or failed (TimeoutError after `timeout`)."""

        def wait() -> dict[str, Any]:
            last = None
            for obj in self._cluster().watch_sweep(name, timeout):
                last = obj
                if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    return obj
            raise TimeoutError(f"FineTuningSweep {name}: not finished after {timeout}s ({last})")

        return await asyncio.to_thread(wait)

    async def merge_models(
        self,
        name: str,
        models: MergeWeights,
        method: str | MergeMethod = MergeMethod.TIES,
        *,
        output: str | VolumeLocation,
        format: str | MergeFormat | None = None,
        density: float | None = None,
        majority_sign_method: str | None = None,
        svd_rank: int | None = None,
        model_name: str | None = None,
    ) -> str:
        """Merge RegisteredModels of one base model into a new one (a ModelMerge named
        `name`, in this tuner's namespace); returns its name at once. `models` maps each
        RegisteredModel to its weight; `output` is CLAIM, CLAIM:PATH or a VolumeLocation."""
        manifest = merge_manifest(
            name,
            models,
            method,
            output=output,
            format=format,
            density=density,
            majority_sign_method=majority_sign_method,
            svd_rank=svd_rank,
            model_name=model_name,
        )
        return await self.create_model_merge(manifest)

    async def create_model_merge(self, manifest: dict[str, Any]) -> str:
        """Create a ModelMerge from a manifest (a dict, checked before it is sent)."""
        check_model_merge(manifest)
        created = await asyncio.to_thread(self._cluster().create_merge, dict(manifest))
        return created["metadata"]["name"]

    async def get_model_merge(self, name: str) -> dict[str, Any]:
        """The merge as stored: its spec and status (phase, conditions, registered model)."""
        return await asyncio.to_thread(self._cluster().get_merge, name)

    async def wait_for_merge(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the merge succeeded or failed (TimeoutError after `timeout`); the
        merged model is then `status.registeredModel`, a failure's reason in its conditions."""

        def wait() -> dict[str, Any]:
            last = None
            for obj in self._cluster().watch_merge(name, timeout):
                last = obj
                if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    return obj
            phase = ((last or {}).get("status") or {}).get("phase", "Pending")
            raise TimeoutError(f"ModelMerge {name}: still {phase} after {timeout}s")

        return await asyncio.to_thread(wait)


_default: ModelFineTuner | None = None


def get_model_fine_tuner() -> ModelFineTuner:
    """The process's default tuner (backend chosen by whether a kubeconfig is configured)."""
    global _default
    if _default is None:
        _default = ModelFineTuner()
    return _default
