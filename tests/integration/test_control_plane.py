"""Smoke tests: the local control plane is made of the real components.

kube-scheduler places pods by GPU requests and taints, kube-controller-manager
runs Jobs and garbage collection, and simulated nodes end pods the way a
kubelet reports them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from kubetune.dev import nodes, simulation
from kubetune.dev.tools import pinned_versions
from tests.support.kube import Kube, observe_unchanged, wait_for, wait_gone

TIMEOUT = 60


def gpu_job(
    name: str,
    *,
    gpus: int = 1,
    annotations: dict[str, str] | None = None,
    tolerate_gpu_taint: bool = True,
    backoff_limit: int = 0,
) -> client.V1Job:
    resources = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    container = client.V1Container(
        name="trainer",
        image="registry.invalid/kubetune/smoke:1",
        command=["python", "-m", "smoke"],
        resources=client.V1ResourceRequirements(
            requests={"cpu": "1", **resources}, limits=resources or None
        ),
    )
    pod_spec = client.V1PodSpec(
        restart_policy="Never",
        containers=[container],
        tolerations=[client.V1Toleration(**nodes.GPU_TOLERATION)] if tolerate_gpu_taint else None,
    )
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=backoff_limit,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(annotations=annotations or {}), spec=pod_spec
            ),
        ),
    )


def job_condition(job: client.V1Job, kind: str) -> bool:
    return any(c.type == kind and c.status == "True" for c in (job.status.conditions or []))


def wait_job(kube: Kube, namespace: str, name: str, kind: str) -> client.V1Job:
    return wait_for(
        kube.batch.list_namespaced_job,
        lambda job: job_condition(job, kind),
        namespace=namespace,
        field_selector=f"metadata.name={name}",
        timeout=TIMEOUT,
        describe=f"job {name} {kind}",
    )


def job_pods(kube: Kube, namespace: str, name: str) -> list[client.V1Pod]:
    return kube.core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items


def terminated_state(pod: client.V1Pod) -> client.V1ContainerStateTerminated:
    [status] = pod.status.container_statuses
    assert status.state.terminated is not None, status
    return status.state.terminated


def gpu_node_names() -> set[str]:
    return {spec.name for spec in nodes.default_fleet() if spec.gpus}


def test_api_server_reports_pinned_version(kube: Kube) -> None:
    info = kube.version.get_code()
    assert info.git_version == pinned_versions()["KUBERNETES_VERSION"]


def test_gpu_and_cpu_nodes_are_ready(kube: Kube) -> None:
    by_name = {node.metadata.name: node for node in kube.core.list_node().items}
    for spec in nodes.default_fleet():
        node = by_name[spec.name]
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
        assert node.status.allocatable.get("nvidia.com/gpu", "0") == str(spec.gpus)
        if spec.gpus:
            assert node.metadata.labels["nvidia.com/gpu.product"] == spec.gpu_product
            assert [t.key for t in node.spec.taints] == ["nvidia.com/gpu"]


def test_gpu_job_is_scheduled_on_a_gpu_node_and_completes(kube: Kube, namespace: str) -> None:
    kube.batch.create_namespaced_job(namespace, gpu_job("train"))

    job = wait_job(kube, namespace, "train", "Complete")

    assert job.status.succeeded == 1
    [pod] = job_pods(kube, namespace, "train")
    assert pod.spec.node_name in gpu_node_names()
    assert pod.status.phase == "Succeeded"
    assert terminated_state(pod).exit_code == 0


def test_cpu_pod_without_toleration_is_kept_off_gpu_nodes(kube: Kube, namespace: str) -> None:
    kube.batch.create_namespaced_job(namespace, gpu_job("prep", gpus=0, tolerate_gpu_taint=False))

    wait_job(kube, namespace, "prep", "Complete")

    [pod] = job_pods(kube, namespace, "prep")
    assert pod.spec.node_name == "cpu-0"


def test_pod_asking_more_gpus_than_any_node_has_stays_pending(kube: Kube, namespace: str) -> None:
    kube.batch.create_namespaced_job(namespace, gpu_job("huge", gpus=64))

    event = wait_for(
        kube.core.list_namespaced_event,
        lambda e: e.reason == "FailedScheduling",
        namespace=namespace,
        timeout=TIMEOUT,
        describe="a FailedScheduling event",
    )

    assert "Insufficient nvidia.com/gpu" in event.message
    assert (
        event.source.component == "default-scheduler"
        or event.reporting_component == "default-scheduler"
    )
    [pod] = job_pods(kube, namespace, "huge")
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None
    [scheduled] = [c for c in pod.status.conditions if c.type == "PodScheduled"]
    assert (scheduled.status, scheduled.reason) == ("False", "Unschedulable")


def test_failing_pod_reports_exit_code_and_termination_message(kube: Kube, namespace: str) -> None:
    annotations = simulation.pod_annotations(
        "fail", exit_code=3, message="dataset row 7: missing field 'text'"
    )
    kube.batch.create_namespaced_job(namespace, gpu_job("bad-data", annotations=annotations))

    job = wait_job(kube, namespace, "bad-data", "Failed")

    assert job.status.failed == 1
    [pod] = job_pods(kube, namespace, "bad-data")
    assert pod.status.phase == "Failed"
    terminated = terminated_state(pod)
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert terminated.message == "dataset row 7: missing field 'text'"


def test_oom_killed_pod_reports_reason_and_exit_137(kube: Kube, namespace: str) -> None:
    kube.batch.create_namespaced_job(
        namespace, gpu_job("oom", annotations=simulation.pod_annotations("oom"))
    )

    wait_job(kube, namespace, "oom", "Failed")

    [pod] = job_pods(kube, namespace, "oom")
    terminated = terminated_state(pod)
    assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled")


def test_running_pod_stays_running_until_deleted_and_job_delete_collects_it(
    kube: Kube, namespace: str
) -> None:
    annotations = simulation.pod_annotations("run", duration="0s")
    kube.batch.create_namespaced_job(namespace, gpu_job("long", annotations=annotations))
    selector = "job-name=long"
    wait_for(
        kube.core.list_namespaced_pod,
        lambda pod: pod.status.phase == "Running",
        namespace=namespace,
        label_selector=selector,
        timeout=TIMEOUT,
        describe="the pod running",
    )

    # Longer than the default run time of a pod that ends (1s).
    observe_unchanged(
        kube.core.list_namespaced_pod,
        lambda pod: pod.status.phase != "Running",
        seconds=3,
        namespace=namespace,
        label_selector=selector,
    )

    kube.batch.delete_namespaced_job("long", namespace, propagation_policy="Background")
    wait_gone(
        kube.core.list_namespaced_pod,
        namespace=namespace,
        label_selector=selector,
        timeout=TIMEOUT,
        describe="the job's pods",
    )


def test_users_kubeconfig_is_left_alone(local_cluster) -> None:
    if local_cluster is None:
        pytest.skip("the session uses an existing cluster")
    user_config = Path.home() / ".kube" / "config"
    assert not user_config.exists() or local_cluster.name not in user_config.read_text()
