"""Multi-node jobs on the real control plane: an Indexed Job over simulated A100 nodes,
a headless Service for stable names, and all pods restarted when one rank fails."""

from __future__ import annotations

import subprocess

import pytest

from kubetune.dev.tools import ensure_tools
from tests.support import finetuning as ft
from tests.support.kube import Kube, wait_for

pytestmark = pytest.mark.usefixtures("operator")

A100 = {"gpus": 8, "gpuType": "NVIDIA-A100-SXM4-80GB", "cpu": "2", "memory": "8Gi"}


@pytest.fixture
def ns(kube: Kube, restricted_namespace: str) -> str:
    ft.create_volumes(kube, restricted_namespace)
    return restricted_namespace


def trainer_pods(kube: Kube, ns: str, name: str) -> list:
    selector = f"kubetune.dev/job-name={name},app.kubernetes.io/component=trainer"
    return kube.core.list_namespaced_pod(ns, label_selector=selector).items


def test_four_nodes_of_eight_gpus_train_as_one_indexed_job(kube: Kube, ns: str) -> None:
    body = ft.manifest(
        "big",
        outcome="run",
        resources={**A100, "nodes": 4},
        dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
    )
    ft.create(kube, ns, body)
    running = ft.wait_status(
        kube,
        ns,
        "big",
        lambda s: s.get("phase") == "Running" and s.get("worldSize") == 32,
        describe="running with 32 processes",
    )["status"]
    assert running["hyperparameters"]["worldSize"] == 32
    assert running["hyperparameters"]["distributedStrategy"] == "ddp"

    job = kube.batch.read_namespaced_job("big-train", ns)
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == (
        "Indexed",
        4,
        4,
    )
    wait_for(
        kube.batch.list_namespaced_job,
        lambda j: (j.status.ready or 0) == 4,
        namespace=ns,
        field_selector="metadata.name=big-train",
        timeout=ft.TIMEOUT,
        describe="4 pods ready",
    )
    pods = trainer_pods(kube, ns, "big")
    assert len({pod.spec.node_name for pod in pods}) == 4  # one pod per node
    assert all(pod.spec.node_name.startswith("gpu-a100-") for pod in pods)
    indexes = sorted(
        int(pod.metadata.annotations["batch.kubernetes.io/job-completion-index"]) for pod in pods
    )
    assert indexes == [0, 1, 2, 3]
    assert {pod.spec.hostname for pod in pods} == {f"big-train-{i}" for i in range(4)}
    assert {pod.spec.subdomain for pod in pods} == {"big-workers"}
    command = pods[0].spec.containers[0].command
    assert "--nnodes=4" in command and "--nproc-per-node=8" in command
    assert "--master-addr=big-train-0.big-workers" in command

    service = kube.core.read_namespaced_service("big-workers", ns)
    assert service.spec.cluster_ip == "None"
    assert service.metadata.owner_references[0].kind == "FineTuningJob"

    kubectl = ensure_tools().kubectl
    table = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kube.kubeconfig), "get", "ftj", "big", "-n", ns],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header, row = table.splitlines()[:2]
    assert "WORLD" in header and " 32 " in row


def test_a_failed_rank_fails_the_attempt_and_the_retry_restarts_all_pods(
    kube: Kube, ns: str
) -> None:
    body = ft.manifest(
        "flaky",
        outcome="fail-rank",
        fail_index=1,
        fail_message=ft.error_message("TrainerError", "rank 9: NCCL watchdog timeout"),
        duration="2s",
        resources={**A100, "nodes": 2},
    )
    ft.create(kube, ns, body)
    restarting = ft.wait_status(
        kube,
        ns,
        "flaky",
        lambda s: (ft.condition(s, "Running") or {}).get("reason") == "Restarting",
        describe="restarting after a failed rank",
    )["status"]
    message = ft.condition(restarting, "Running")["message"]
    assert "NCCL watchdog timeout" in message and "restarting all 2 pods" in message

    done = ft.wait_phase(kube, ns, "flaky", "Succeeded")["status"]
    assert (done["retries"], done["restarts"], done["preemptions"]) == (1, 1, 0)
    assert done["registeredModel"] == "flaky"
    # Both pods of the second attempt ran again: none of the first attempt is left.
    pods = trainer_pods(kube, ns, "flaky")
    assert sorted(p.metadata.annotations["kubetune.dev/restart"] for p in pods) == ["1", "1"]
    assert all(p.status.phase == "Succeeded" for p in pods)
