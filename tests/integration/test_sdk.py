"""The SDK's cluster backend against the real control plane and the operator."""

from __future__ import annotations

import asyncio

import pytest

from kubetune.dev import simulation
from kubetune.fine_tuning import DatasetFormat, FineTuningConfig, FineTuningMethod, ModelFineTuner
from tests.support import finetuning as ft
from tests.support.kube import Kube

pytestmark = pytest.mark.usefixtures("operator")


def cluster_config(outcome: str = "succeed", **kwargs) -> FineTuningConfig:
    message = ft.success_message() if outcome == "succeed" else None
    return FineTuningConfig(
        "kubetune/tiny-llama",
        FineTuningMethod.LORA,
        "pvc://datasets/support.jsonl",
        DatasetFormat.JSONL,
        "pvc://models/out",
        epochs=1,
        learning_rate=2e-4,
        lora_rank=4,
        additional_params={
            "model_volume": "pvc://models/tiny-llama",
            "fields": {"prompt": "question", "completion": "answer"},
            "gpus": 1,
            "cpu": "2",
            "memory": "8Gi",
            "pod_annotations": simulation.pod_annotations(outcome, message=message),
        },
        **kwargs,
    )


@pytest.fixture
def tuner(kube: Kube, namespace: str) -> ModelFineTuner:
    ft.create_volumes(kube, namespace)
    return ModelFineTuner(backend="cluster", kubeconfig=kube.kubeconfig, namespace=namespace)


def test_create_wait_register(kube: Kube, namespace: str, tuner: ModelFineTuner) -> None:
    async def scenario():
        job_id = await tuner.create_fine_tuning_job(cluster_config())
        assert tuner.jobs[job_id].status == "created"
        spec = ft.get(kube, namespace, job_id)["spec"]
        assert spec["method"] == "LORA" and spec["lora"]["rank"] == 4
        assert spec["baseModel"] == {
            "name": "kubetune/tiny-llama",
            "volume": {"claimName": "models", "path": "tiny-llama"},
            "trustRemoteCode": False,
        }
        assert spec["dataset"]["volume"] == {"claimName": "datasets", "path": "support.jsonl"}
        assert spec["output"]["volume"] == {"claimName": "models", "path": f"out/{job_id}"}
        assert spec["hyperparameters"]["learningRate"] == 2e-4
        assert spec["hyperparameters"]["epochs"] == 1

        result = await tuner.wait_for_completion(job_id, timeout=ft.TIMEOUT)
        assert result.status == "completed" and result.phase == "Succeeded"
        assert result.metrics["eval_loss"] == 1.5
        model = await tuner.register_fine_tuned_model(job_id)
        assert model == ft.get(kube, namespace, job_id)["status"]["registeredModel"] == job_id
        assert await tuner.register_fine_tuned_model(job_id) == model
        [listed] = await tuner.list_fine_tuning_jobs(model_id="kubetune/tiny-llama")
        assert listed.fine_tuned_model_id == model

        # Another tuner (another process) follows the same job by its id.
        other = ModelFineTuner(backend=tuner.backend)
        assert (await other.get_fine_tuning_job(job_id)).status == "completed"
        assert await other.get_fine_tuning_job("ft-missing-000000000000-000000") is None

    asyncio.run(scenario())


def test_cancel(kube: Kube, namespace: str, tuner: ModelFineTuner) -> None:
    async def scenario():
        job_id = await tuner.create_fine_tuning_job(cluster_config("run"))
        assert await tuner.cancel_fine_tuning_job(job_id)
        assert (await tuner.get_fine_tuning_job(job_id)).status == "cancelled"
        assert ft.get(kube, namespace, job_id)["spec"]["cancel"] is True
        result = await tuner.wait_for_completion(job_id, timeout=ft.TIMEOUT)
        assert result.status == "cancelled"
        ft.wait_phase(kube, namespace, job_id, "Cancelled")
        assert (await tuner.get_fine_tuning_job(job_id)).phase == "Cancelled"
        with pytest.raises(ValueError, match="is cancelled, not completed"):
            await tuner.register_fine_tuned_model(job_id)

    asyncio.run(scenario())


def test_failure_is_reported(kube: Kube, namespace: str, tuner: ModelFineTuner) -> None:
    async def scenario():
        config = cluster_config("succeed")
        config.additional_params["pod_annotations"] = simulation.pod_annotations(
            "fail", exit_code=65, message=ft.error_message("InvalidDataset", "row 3 is bad")
        )
        job_id = await tuner.create_fine_tuning_job(config)
        result = await tuner.wait_for_completion(job_id, timeout=ft.TIMEOUT)
        assert result.status == "failed"
        assert result.error.startswith("InvalidDataset:") and "row 3 is bad" in result.error

    asyncio.run(scenario())
