"""The operator on the real control plane: FineTuningJob in, Jobs, status and RegisteredModel out.

Trainer pods run on simulated GPU nodes whose outcome each test steers (see
kubetune.dev.simulation); the API server, scheduler, Job controller and garbage
collector are the real ones.
"""

from __future__ import annotations

import subprocess

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune.api import GROUP, VERSION
from kubetune.api.trainer import ProgressReport
from kubetune.dev.processes import OperatorProcess
from kubetune.dev.tools import ensure_tools
from tests.support import finetuning as ft
from tests.support import reports
from tests.support.argocd import health
from tests.support.kube import Kube, wait_for, wait_gone

pytestmark = pytest.mark.usefixtures("operator")


@pytest.fixture
def ns(kube: Kube, restricted_namespace: str) -> str:
    ft.create_volumes(kube, restricted_namespace)
    return restricted_namespace


def jobs(kube: Kube, ns: str, name: str) -> list:
    return kube.batch.list_namespaced_job(ns, label_selector=f"kubetune.dev/job-name={name}").items


def wait_job(kube: Kube, ns: str, job_name: str):
    return wait_for(
        kube.batch.list_namespaced_job,
        lambda j: True,
        namespace=ns,
        field_selector=f"metadata.name={job_name}",
        timeout=ft.TIMEOUT,
        describe=f"job {job_name}",
    )


def registered_models(kube: Kube, ns: str) -> list[dict]:
    return kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "registeredmodels")[
        "items"
    ]


def test_success_path_validates_trains_reports_progress_and_registers(
    kube: Kube, ns: str, operator: OperatorProcess
) -> None:
    ft.create(kube, ns, ft.manifest("support-bot", duration="3s"))

    status = ft.wait_phase(kube, ns, "support-bot", "Validating")["status"]
    assert ft.condition(status, "DatasetValidated")["status"] == "Unknown"
    # The trainer (simulated) reports progress to the operator's endpoint with its
    # pod's token.
    progress = ProgressReport(
        step=120,
        total_steps=600,
        epoch=0.2,
        loss=1.8,
        tokens_per_second=2500.0,
        eta_seconds=260,
        timestamp="2026-11-25T12:00:00Z",
    )
    pod = reports.first_pod(kube, ns, "support-bot", "dataset-validator")
    token = reports.pod_token(kube, ns, pod)
    document = progress.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert reports.post(operator, ns, "support-bot", {"progress": document}, token)[0] == 204

    running = ft.wait_status(
        kube,
        ns,
        "support-bot",
        lambda s: (s.get("progress") or {}).get("steps") == "120/600",
        describe="progress",
    )
    assert running["status"]["progress"]["eta"] == "4m20s"
    validated = ft.wait_status(
        kube,
        ns,
        "support-bot",
        lambda s: (ft.condition(s, "DatasetValidated") or {}).get("reason") == "DatasetValid",
        describe="dataset validated",
    )
    assert (
        "100 of 120 rows kept" in ft.condition(validated["status"], "DatasetValidated")["message"]
    )

    done = ft.wait_phase(kube, ns, "support-bot", "Succeeded")["status"]
    assert done["registeredModel"] == "support-bot"
    assert done["metrics"]["eval_loss"] == 1.5
    assert done["hyperparameters"]["learningRate"] == 2e-4
    assert done["hyperparameters"]["epochs"] == 1
    assert done["progress"]["steps"] == "600/600"
    assert done["startTime"] and done["completionTime"]
    assert {c["type"]: c["status"] for c in done["conditions"]}.items() >= {
        "DatasetValidated": "True",
        "Succeeded": "True",
        "Registered": "True",
        "Running": "False",
        "Ready": "True",
    }.items()
    assert all(c["observedGeneration"] == 1 for c in done["conditions"])
    # Generic tools read the summary: kubectl wait, and Argo CD's health check.
    waited = subprocess.run(
        [str(ensure_tools().kubectl), "--kubeconfig", str(kube.kubeconfig), "wait", "-n", ns,
         "ftj/support-bot", "--for=condition=Ready", "--timeout=10s"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert waited.returncode == 0, waited.stderr
    assert health(ft.get(kube, ns, "support-bot")) == (
        "Healthy",
        "Succeeded: trained and registered",
    )

    [model] = registered_models(kube, ns)
    spec = model["spec"]
    job = ft.get(kube, ns, "support-bot")
    assert spec["sourceJob"]["uid"] == job["metadata"]["uid"]
    assert spec["baseModel"]["name"] == "kubetune/tiny-llama"
    assert spec["method"] == "LORA"
    assert spec["adapter"]["lora"]["rank"] == 8
    folder = f"support-bot-{job['metadata']['uid'].split('-')[0]}"  # the job's own folder
    assert spec["artifact"] == {
        "volume": {"claimName": "models", "path": f"out/{folder}/model"},
        "kind": "adapter",
        "digest": ft.RESULT.artifact.digest,
    }
    assert spec["dataset"]["digest"] == ft.RESULT.dataset_digest
    assert spec["hyperparameters"]["learningRate"] == 2e-4
    assert spec["trainerImage"] == "registry.invalid/kubetune/trainer:test"
    assert "vllm serve" in spec["serving"]["vllm"]

    # An event when something happened, ending with the registration (posted right after
    # the status); none for the steps in between.
    selector = "involvedObject.name=support-bot,involvedObject.kind=FineTuningJob"
    wait_for(
        kube.core.list_namespaced_event,
        lambda e: e.reason == "ModelRegistered",
        namespace=ns,
        field_selector=selector,
        timeout=ft.TIMEOUT,
        describe="the ModelRegistered event",
    )
    reasons = [e.reason for e in kube.core.list_namespaced_event(ns, field_selector=selector).items]
    assert {"DatasetValid", "TrainerRunning", "TrainingComplete", "ModelRegistered"} <= set(reasons)
    assert not {"Validating", "PodPending", "NotSuspended"} & set(reasons)

    # The printer columns.
    kubectl = ensure_tools().kubectl
    table = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kube.kubeconfig), "get", "ftj", "-n", ns],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Succeeded" in table and "600/600" in table and "kubetune/tiny-llama" in table


def test_training_job_shape_on_the_cluster(kube: Kube, ns: str) -> None:
    ft.create(
        kube,
        ns,
        ft.manifest(
            "shaped",
            outcome="run",
            resources={"gpus": 2, "gpuType": "NVIDIA-A100-SXM4-80GB", "cpu": "8", "memory": "64Gi"},
            baseModel={
                "name": "org/model",
                "revision": "0123abc",
                "tokenSecretRef": {"name": "hf-token"},
            },
            activeDeadlineSeconds=3600,
            dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
        ),
    )
    job = wait_job(kube, ns, "shaped-train")
    pod_spec = job.spec.template.spec
    [container] = pod_spec.containers
    assert container.image == "registry.invalid/kubetune/trainer:test"
    assert container.resources.limits["nvidia.com/gpu"] == "2"
    assert pod_spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert job.spec.active_deadline_seconds == 3600
    assert job.metadata.owner_references[0].kind == "FineTuningJob"
    assert [e.value_from.secret_key_ref.name for e in container.env if e.name == "HF_TOKEN"] == [
        "hf-token"
    ]

    # The restricted Pod Security Standard is enforced in this namespace: the
    # pod exists only because it complies. And the scheduler put it on a GPU node.
    pod = wait_for(
        kube.core.list_namespaced_pod,
        lambda p: p.status.phase == "Running",
        namespace=ns,
        label_selector="kubetune.dev/job-name=shaped",
        timeout=ft.TIMEOUT,
        describe="trainer running",
    )
    assert pod.spec.node_name.startswith("gpu-a100-")
    ft.wait_phase(kube, ns, "shaped", "Running")


def test_invalid_dataset_fails_fast_without_requesting_gpus(kube: Kube, ns: str) -> None:
    message = "row 17: field 'answer' is missing; add it or map spec.dataset.fields.completion"
    ft.create(
        kube,
        ns,
        ft.manifest(
            "bad-data",
            outcome="fail",
            exit_code=65,
            message=ft.error_message("InvalidDataset", message),
        ),
    )

    status = ft.wait_phase(kube, ns, "bad-data", "Failed")["status"]

    assert status["failure"] == {"reason": "InvalidDataset", "message": message, "exitCode": 65}
    assert ft.condition(status, "DatasetValidated")["status"] == "False"
    assert [j.metadata.name for j in jobs(kube, ns, "bad-data")] == ["bad-data-validate"]
    events = kube.core.list_namespaced_event(
        ns, field_selector="involvedObject.name=bad-data,type=Warning"
    ).items
    assert any(e.reason == "InvalidDataset" and message in e.message for e in events)
    assert health(ft.get(kube, ns, "bad-data")) == ("Degraded", f"Failed: {message}")


@pytest.mark.parametrize(
    ("outcome", "extra", "reason", "text"),
    [
        ("oom", {}, "OOMKilled", "batchSize"),
        (
            "fail",
            {
                "exit_code": 1,
                "message": ft.error_message("TrainerError", "CUDA error: device-side assert"),
            },
            "TrainerError",
            "CUDA error: device-side assert",
        ),
        (
            "fail",
            {
                "exit_code": 66,
                "message": ft.error_message("InputNotFound", "model org/x@abc not found"),
            },
            "InputNotFound",
            "model org/x@abc not found",
        ),
    ],
)
def test_training_failures_are_classified(
    kube: Kube, ns: str, outcome, extra, reason, text
) -> None:
    name = f"fails-{outcome}-{reason.lower()}"[:40]
    ft.create(
        kube,
        ns,
        ft.manifest(
            name,
            outcome=outcome,
            maxRetries=0,
            dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
            **extra,
        ),
    )

    status = ft.wait_phase(kube, ns, name, "Failed")["status"]

    assert status["failure"]["reason"] == reason
    assert text in status["failure"]["message"]


def test_retries_then_reports_the_last_error(kube: Kube, ns: str) -> None:
    ft.create(
        kube,
        ns,
        ft.manifest(
            "flaky",
            outcome="fail",
            exit_code=1,
            maxRetries=1,
            message=ft.error_message("TrainerError", "NaN loss"),
            dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
        ),
    )
    status = ft.wait_phase(kube, ns, "flaky", "Failed")["status"]
    assert status["failure"]["message"] == "failed 2 time(s), last error: NaN loss"
    assert status["retries"] == 2


def test_deadline_exceeded(kube: Kube, ns: str) -> None:
    ft.create(
        kube,
        ns,
        ft.manifest(
            "slow",
            outcome="run",
            activeDeadlineSeconds=2,
            dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
        ),
    )
    status = ft.wait_phase(kube, ns, "slow", "Failed")["status"]
    assert status["failure"]["reason"] == "DeadlineExceeded"


def test_unpullable_image_fails_after_the_timeout_and_stops_the_pod(kube: Kube, ns: str) -> None:
    ft.create(
        kube,
        ns,
        ft.manifest(
            "no-image",
            outcome="image-pull",
            image="registry.invalid/nope:1",
            dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
        ),
    )
    status = ft.wait_phase(kube, ns, "no-image", "Failed")["status"]
    assert status["failure"]["reason"] == "ImagePullFailed"
    assert "registry.invalid/nope:1" in status["failure"]["message"]
    wait_gone(
        kube.batch.list_namespaced_job,
        namespace=ns,
        field_selector="metadata.name=no-image-train",
        timeout=ft.TIMEOUT,
        describe="the stuck Job",
    )


def test_preemption_is_retried_without_counting_as_failure(kube: Kube, ns: str) -> None:
    ft.create(
        kube,
        ns,
        ft.manifest(
            "preempted",
            outcome="run",
            maxRetries=0,
            dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
        ),
    )
    first = wait_for(
        kube.core.list_namespaced_pod,
        lambda p: p.status.phase == "Running",
        namespace=ns,
        label_selector="kubetune.dev/job-name=preempted",
        timeout=ft.TIMEOUT,
        describe="trainer running",
    )
    # Eviction (as by a node drain or the scheduler's preemption) marks the pod DisruptionTarget.
    kube.core.create_namespaced_pod_eviction(
        first.metadata.name, ns, {"metadata": {"name": first.metadata.name, "namespace": ns}}
    )

    status = ft.wait_status(
        kube,
        ns,
        "preempted",
        lambda s: s.get("preemptions", 0) >= 1 and s.get("phase") == "Running",
        describe="preempted and running again",
    )["status"]
    assert status["retries"] == 0
    assert "failure" not in status


def test_suspend_and_resume(kube: Kube, ns: str) -> None:
    ft.create(
        kube,
        ns,
        ft.manifest(
            "pausable", outcome="run", dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False}
        ),
    )
    ft.wait_phase(kube, ns, "pausable", "Running")

    ft.patch_spec(kube, ns, "pausable", {"suspend": True})
    ft.wait_phase(kube, ns, "pausable", "Suspended")
    wait_gone(
        kube.core.list_namespaced_pod,
        namespace=ns,
        label_selector="kubetune.dev/job-name=pausable",
        timeout=ft.TIMEOUT,
        describe="suspended pods",
    )

    ft.patch_spec(kube, ns, "pausable", {"suspend": False})
    ft.wait_phase(kube, ns, "pausable", "Running")


def test_spec_cannot_change_once_training_started(kube: Kube, ns: str) -> None:
    ft.create(
        kube,
        ns,
        ft.manifest(
            "frozen", outcome="run", dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False}
        ),
    )
    ft.wait_status(kube, ns, "frozen", lambda s: bool(s.get("startTime")), describe="started")
    with pytest.raises(ApiException) as refused:
        ft.patch_spec(kube, ns, "frozen", {"hyperparameters": {"epochs": 9}})
    assert refused.value.status == 422
    assert "cannot change once training has started" in refused.value.body
    ft.patch_spec(kube, ns, "frozen", {"cancel": True})
    ft.wait_phase(kube, ns, "frozen", "Cancelled")


def test_queue_label_creates_the_job_suspended_for_kueue(kube: Kube, ns: str) -> None:
    ft.create(
        kube,
        ns,
        ft.manifest(
            "queued",
            labels={"kueue.x-k8s.io/queue-name": "gpu-queue"},
            dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
        ),
    )
    ft.wait_phase(kube, ns, "queued", "Queued")
    job = wait_job(kube, ns, "queued-train")
    assert job.spec.suspend is True
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    # Kueue admits a workload by unsuspending its Job.
    kube.batch.patch_namespaced_job("queued-train", ns, {"spec": {"suspend": False}})
    ft.wait_phase(kube, ns, "queued", "Succeeded")


def test_too_many_gpus_stays_queued_with_the_scheduler_message(kube: Kube, ns: str) -> None:
    ft.create(
        kube,
        ns,
        ft.manifest(
            "greedy",
            resources={"gpus": 64},
            dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
        ),
    )
    status = ft.wait_status(
        kube,
        ns,
        "greedy",
        lambda s: (ft.condition(s, "Running") or {}).get("reason") == "Unschedulable",
        describe="unschedulable",
    )["status"]
    assert status["phase"] == "Queued"
    assert "nvidia.com/gpu" in ft.condition(status, "Running")["message"]


def test_deleting_the_job_stops_training_and_keeps_registered_models(kube: Kube, ns: str) -> None:
    ft.create(kube, ns, ft.manifest("done-then-deleted"))
    ft.wait_phase(kube, ns, "done-then-deleted", "Succeeded")
    ft.create(
        kube,
        ns,
        ft.manifest(
            "deleted-while-running",
            outcome="run",
            dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
        ),
    )
    ft.wait_phase(kube, ns, "deleted-while-running", "Running")

    for name in ("done-then-deleted", "deleted-while-running"):
        kube.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "finetuningjobs", name)
        for list_fn in (kube.batch.list_namespaced_job, kube.core.list_namespaced_pod):
            wait_gone(
                list_fn,
                namespace=ns,
                label_selector=f"kubetune.dev/job-name={name}",
                timeout=ft.TIMEOUT,
                describe=f"children of {name}",
            )

    assert [m["metadata"]["name"] for m in registered_models(kube, ns)] == ["done-then-deleted"]


def test_operator_killed_mid_flight_creates_nothing_twice(
    kube: Kube, ns: str, operator: OperatorProcess
) -> None:
    ft.create(kube, ns, ft.manifest("survivor", duration="4s"))
    first = wait_job(kube, ns, "survivor-train")

    operator.kill()
    operator.start()

    ft.wait_phase(kube, ns, "survivor", "Succeeded")
    [train] = [j for j in jobs(kube, ns, "survivor") if j.metadata.name == "survivor-train"]
    assert train.metadata.uid == first.metadata.uid
    assert len(jobs(kube, ns, "survivor")) == 2  # validate + train, once each
    models = [
        m for m in registered_models(kube, ns) if m["spec"]["sourceJob"]["name"] == "survivor"
    ]
    assert len(models) == 1


def test_operator_exposes_metrics(operator: OperatorProcess) -> None:
    text = operator.metrics()
    assert "kubetune_reconcile_total" in text
    assert "kubetune_finetuningjobs" in text
    requests = [
        line
        for line in text.splitlines()
        if line.startswith("kubetune_operator_api_requests_total{")
    ]
    assert any(float(line.rsplit(" ", 1)[1]) > 0 for line in requests), requests
