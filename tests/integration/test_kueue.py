"""FineTuningJobs queued by the real Kueue (v0.17.1) on the local control plane.

Kueue runs as a local process for this module (see kubetune.dev.kueue) and
manages the training Jobs that carry `kueue.x-k8s.io/queue-name`; quotas are
ClusterQueues over one ResourceFlavor for the simulated A100 nodes. Each test
has its own ClusterQueue (named after its namespace) and LocalQueue, so that
quotas never mix between tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubetune.dev.kueue import Kueue
from kubetune.dev.nodes import GPU_RESOURCE
from kubetune.dev.tools import ensure_tools
from tests.support import finetuning as ft
from tests.support.kube import Kube, WaitTimeout, observe_unchanged, wait_for, wait_gone

pytestmark = pytest.mark.usefixtures("operator")

KUEUE = "kueue.x-k8s.io"
KUEUE_VERSION = "v1beta2"
QUEUE_LABEL = f"{KUEUE}/queue-name"
LOCAL_QUEUE = "gpus"
FLAVOR = "kubetune-test-a100"
A100 = "NVIDIA-A100-SXM4-80GB"
HIGH, LOW = "kubetune-test-high", "kubetune-test-low"
NO_VALIDATION = {**ft.BASE_SPEC["dataset"], "validateFirst": False}


def kueue_lister(kube: Kube, plural: str, namespace: str | None = None) -> Callable[..., Any]:
    """A list function for Kueue's objects that wait_for (and its watches) accept."""

    def list_objects(**kwargs: Any) -> Any:
        if namespace is None:
            return kube.custom.list_cluster_custom_object(KUEUE, KUEUE_VERSION, plural, **kwargs)
        return kube.custom.list_namespaced_custom_object(
            KUEUE, KUEUE_VERSION, namespace, plural, **kwargs
        )

    return list_objects


def kueue_condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_),
        None,
    )


@pytest.fixture(scope="module")
def kueue(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    """Kueue on the session's cluster for this module, with a ResourceFlavor for the
    A100 nodes and two PriorityClasses. Afterwards its workloads are let go and its
    webhooks removed: Jobs of later modules never meet a Kueue that is gone."""
    process = Kueue(kube.kubeconfig, ensure_tools().kubectl, tmp_path_factory.mktemp("kueue"))
    process.start()
    flavor = {
        "apiVersion": f"{KUEUE}/{KUEUE_VERSION}",
        "kind": "ResourceFlavor",
        "metadata": {"name": FLAVOR},
        "spec": {"nodeLabels": {"nvidia.com/gpu.product": A100}},
    }
    priorities = [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": name},
            "value": value,
        }
        for name, value in ((HIGH, 1000), (LOW, 10))
    ]
    process.apply([flavor, *priorities])
    try:
        yield process
    finally:
        # The tests' namespaces are being deleted: their Workloads (and the
        # ClusterQueues in use) hold Kueue's finalizer, which only Kueue removes.
        with contextlib.suppress(WaitTimeout):
            wait_gone(kueue_lister(kube, "workloads"), timeout=30, describe="workloads")
        process.stop()
        let_go = ["--type=merge", "-p", '{"metadata":{"finalizers":null}}']
        for workload in kueue_lister(kube, "workloads")()["items"]:
            meta = workload["metadata"]
            process.kubectl("patch", "workloads", meta["name"], "-n", meta["namespace"], *let_go)
        for cluster_queue in kueue_lister(kube, "clusterqueues")()["items"]:
            if cluster_queue["metadata"].get("deletionTimestamp"):
                process.kubectl(
                    "patch", "clusterqueues", cluster_queue["metadata"]["name"], *let_go
                )
        process.kubectl("delete", "priorityclass", HIGH, LOW, "--ignore-not-found", check=False)
        print(f"kueue log: {process.log_path}")


@pytest.fixture
def queue(kube: Kube, kueue: Kueue, namespace: str) -> Iterator[Callable[..., str]]:
    """Make this test's ClusterQueue (a GPU quota on the A100 flavor) and its LocalQueue
    `gpus`; returns the LocalQueue's name. The ClusterQueue is deleted afterwards."""
    made: list[str] = []

    def make(gpus: int, *, preemption: dict[str, str] | None = None) -> str:
        cluster_queue = {
            "apiVersion": f"{KUEUE}/{KUEUE_VERSION}",
            "kind": "ClusterQueue",
            "metadata": {"name": namespace},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "queueingStrategy": "BestEffortFIFO",
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", GPU_RESOURCE],
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "64"},
                                    {"name": "memory", "nominalQuota": "1Ti"},
                                    {"name": GPU_RESOURCE, "nominalQuota": str(gpus)},
                                ],
                            }
                        ],
                    }
                ],
                **({"preemption": preemption} if preemption else {}),
            },
        }
        local_queue = {
            "apiVersion": f"{KUEUE}/{KUEUE_VERSION}",
            "kind": "LocalQueue",
            "metadata": {"name": LOCAL_QUEUE, "namespace": namespace},
            "spec": {"clusterQueue": namespace},
        }
        kueue.apply([cluster_queue, local_queue])
        made.append(namespace)
        for plural, ns in (("clusterqueues", None), ("localqueues", namespace)):
            wait_for(
                kueue_lister(kube, plural, ns),
                lambda q: (kueue_condition(q, "Active") or {}).get("status") == "True",
                timeout=30,
                describe=f"{plural} active",
            )
        return LOCAL_QUEUE

    yield make
    for name in made:
        kueue.kubectl("delete", "clusterqueue", name, "--wait=false", check=False)


@pytest.fixture
def ns(kube: Kube, namespace: str) -> str:
    ft.create_volumes(kube, namespace)
    return namespace


def queued(name: str, local_queue: str, **kwargs: Any) -> dict[str, Any]:
    """A FineTuningJob for the LocalQueue (no dataset validation unless asked)."""
    kwargs.setdefault("dataset", NO_VALIDATION)
    return ft.manifest(name, labels={QUEUE_LABEL: local_queue}, **kwargs)


def train_job(kube: Kube, ns: str, name: str, predicate: Callable[[Any], bool] = lambda j: True):
    return wait_for(
        kube.batch.list_namespaced_job,
        predicate,
        namespace=ns,
        field_selector=f"metadata.name={name}-train",
        timeout=ft.TIMEOUT,
        describe=f"job {name}-train",
    )


def workload_of(kube: Kube, ns: str, job_uid: str, predicate=lambda w: True) -> dict[str, Any]:
    """The Workload Kueue made for a Job (it labels it with the Job's UID)."""
    return wait_for(
        kueue_lister(kube, "workloads", ns),
        predicate,
        label_selector=f"{KUEUE}/job-uid={job_uid}",
        timeout=ft.TIMEOUT,
        describe=f"workload of job {job_uid}",
    )


def pending_message(kube: Kube, ns: str, job_uid: str) -> str:
    """Kueue's reason for not admitting the Job's Workload (QuotaReserved False)."""
    workload = workload_of(
        kube,
        ns,
        job_uid,
        lambda w: (
            (kueue_condition(w, "QuotaReserved") or {}).get("status") == "False"
            and bool((kueue_condition(w, "QuotaReserved") or {}).get("message"))
        ),
    )
    return kueue_condition(workload, "QuotaReserved")["message"]


def test_jobs_beyond_the_quota_wait_queued_and_start_when_the_first_finishes(
    kube: Kube, ns: str, queue: Callable[..., str]
) -> None:
    local_queue = queue(gpus=1)
    ft.create(kube, ns, queued("first", local_queue, duration="6s"))
    ft.wait_phase(kube, ns, "first", "Running")
    ft.create(kube, ns, queued("second", local_queue, duration="2s"))

    status = ft.wait_phase(kube, ns, "second", "Queued")["status"]
    suspended = ft.condition(status, "Suspended")
    assert suspended["status"] == "True"
    assert suspended["reason"] == "WaitingForQueue"
    job = train_job(kube, ns, "second")
    assert job.spec.suspend is True
    assert job.metadata.labels[QUEUE_LABEL] == local_queue
    assert "insufficient unused quota" in pending_message(kube, ns, job.metadata.uid)
    # Kueue resumes it (kubetune never does) once the first one is done.
    first = ft.wait_finished(kube, ns, "first")
    assert first["phase"] == "Succeeded"
    second = ft.wait_finished(kube, ns, "second")
    assert second["phase"] == "Succeeded"
    assert second["startTime"] >= first["completionTime"]
    admitted = workload_of(kube, ns, job.metadata.uid)
    assert admitted["status"]["admission"]["podSetAssignments"][0]["flavors"] == {
        "cpu": FLAVOR,
        "memory": FLAVOR,
        GPU_RESOURCE: FLAVOR,
    }


def test_a_queued_job_shows_kueues_reason_in_its_status(
    kube: Kube, ns: str, queue: Callable[..., str]
) -> None:
    """Jobs beyond the quota wait as Queued with the reason from Kueue in the status."""
    local_queue = queue(gpus=1)
    ft.create(kube, ns, queued("holder", local_queue, outcome="run"))
    ft.wait_phase(kube, ns, "holder", "Running")
    ft.create(kube, ns, queued("waiting", local_queue))
    job = train_job(kube, ns, "waiting")
    reason = pending_message(kube, ns, job.metadata.uid)

    status = ft.wait_status(
        kube,
        ns,
        "waiting",
        lambda s: (
            s.get("phase") == "Queued"
            and reason in (ft.condition(s, "Suspended") or {}).get("message", "")
        ),
        describe="queued with Kueue's reason",
        timeout=10,
    )["status"]
    assert reason in ft.condition(status, "Ready")["message"]
    ft.patch_spec(kube, ns, "holder", {"cancel": True})
    ft.wait_phase(kube, ns, "waiting", "Succeeded")


def test_a_two_node_job_is_admitted_whole_only_when_both_gpus_fit(
    kube: Kube, ns: str, queue: Callable[..., str]
) -> None:
    local_queue = queue(gpus=2)
    ft.create(kube, ns, queued("holder", local_queue, duration="8s"))
    ft.wait_phase(kube, ns, "holder", "Running")
    ft.create(
        kube,
        ns,
        queued(
            "pair", local_queue, duration="2s", resources={**ft.BASE_SPEC["resources"], "nodes": 2}
        ),
    )
    ft.wait_phase(kube, ns, "pair", "Queued")
    job = train_job(kube, ns, "pair")
    assert job.spec.suspend is True and job.spec.parallelism == 2
    # One GPU is free, but the Workload asks for both pods' GPUs at once.
    assert "insufficient unused quota" in pending_message(kube, ns, job.metadata.uid)
    observe_unchanged(
        kube.core.list_namespaced_pod,
        lambda pod: True,
        seconds=3,
        namespace=ns,
        label_selector="kubetune.dev/job-name=pair",
    )

    holder = ft.wait_finished(kube, ns, "holder")
    pair = ft.wait_finished(kube, ns, "pair")
    assert holder["phase"] == pair["phase"] == "Succeeded"
    assert pair["startTime"] >= holder["completionTime"]
    workload = workload_of(kube, ns, job.metadata.uid)
    assignment = workload["status"]["admission"]["podSetAssignments"][0]
    assert assignment["count"] == 2
    assert assignment["resourceUsage"][GPU_RESOURCE] == "2"
    finished = train_job(kube, ns, "pair")
    assert finished.status.succeeded == 2 and not finished.status.failed


def test_suspending_a_queued_job_keeps_it_suspended_after_quota_frees(
    kube: Kube, ns: str, queue: Callable[..., str]
) -> None:
    local_queue = queue(gpus=1)
    ft.create(kube, ns, queued("holder", local_queue, duration="4s"))
    ft.wait_phase(kube, ns, "holder", "Running")
    ft.create(kube, ns, queued("paused", local_queue, duration="2s"))
    ft.wait_phase(kube, ns, "paused", "Queued")

    ft.patch_spec(kube, ns, "paused", {"suspend": True})
    status = ft.wait_phase(kube, ns, "paused", "Suspended")["status"]
    assert ft.condition(status, "Suspended")["reason"] == "SuspendedByUser"
    assert ft.wait_finished(kube, ns, "holder")["phase"] == "Succeeded"
    # The quota is free now: Kueue must not run a job its user suspended.
    observe_unchanged(
        kube.batch.list_namespaced_job,
        lambda job: not job.spec.suspend,
        seconds=5,
        namespace=ns,
        field_selector="metadata.name=paused-train",
    )
    assert ft.get(kube, ns, "paused")["status"]["phase"] == "Suspended"

    ft.patch_spec(kube, ns, "paused", {"suspend": False})
    assert ft.wait_finished(kube, ns, "paused")["phase"] == "Succeeded"


def test_suspending_an_admitted_job_stops_it_and_frees_the_quota(
    kube: Kube, ns: str, queue: Callable[..., str]
) -> None:
    local_queue = queue(gpus=1)
    ft.create(kube, ns, queued("long", local_queue, outcome="run"))
    ft.wait_phase(kube, ns, "long", "Running")

    ft.patch_spec(kube, ns, "long", {"suspend": True})
    ft.wait_phase(kube, ns, "long", "Suspended")
    wait_gone(
        kube.core.list_namespaced_pod,
        namespace=ns,
        label_selector="kubetune.dev/job-name=long",
        timeout=ft.TIMEOUT,
        describe="suspended pods",
    )
    observe_unchanged(
        kube.batch.list_namespaced_job,
        lambda job: not job.spec.suspend,
        seconds=5,
        namespace=ns,
        field_selector="metadata.name=long-train",
    )
    # Its GPU went back to the queue: another job runs meanwhile.
    ft.create(kube, ns, queued("short", local_queue, duration="2s"))
    assert ft.wait_finished(kube, ns, "short")["phase"] == "Succeeded"

    ft.patch_spec(kube, ns, "long", {"suspend": False})
    status = ft.wait_phase(kube, ns, "long", "Running")["status"]
    assert status["retries"] == 0
    ft.patch_spec(kube, ns, "long", {"cancel": True})
    ft.wait_phase(kube, ns, "long", "Cancelled")


def test_a_preempted_job_counts_a_preemption_and_completes_after_the_higher_one(
    kube: Kube, ns: str, queue: Callable[..., str]
) -> None:
    local_queue = queue(gpus=1, preemption={"withinClusterQueue": "LowerPriority"})
    resources = ft.BASE_SPEC["resources"]
    ft.create(
        kube,
        ns,
        queued(
            "low", local_queue, duration="8s", resources={**resources, "priorityClassName": LOW}
        ),
    )
    ft.wait_phase(kube, ns, "low", "Running")
    low_job = train_job(kube, ns, "low")
    ft.create(
        kube,
        ns,
        queued(
            "high", local_queue, duration="2s", resources={**resources, "priorityClassName": HIGH}
        ),
    )

    # Kueue evicts the low one (its Job suspended again) to admit the high one.
    evicted = workload_of(
        kube,
        ns,
        low_job.metadata.uid,
        lambda w: (kueue_condition(w, "Evicted") or {}).get("reason") == "Preempted",
    )
    assert "Preempted to accommodate" in kueue_condition(evicted, "Evicted")["message"]
    train_job(kube, ns, "low", lambda j: j.spec.suspend)
    status = ft.wait_phase(kube, ns, "low", "Queued")["status"]
    assert ft.condition(status, "Suspended")["reason"] == "WaitingForQueue"

    high = ft.wait_finished(kube, ns, "high")
    low = ft.wait_finished(kube, ns, "low")
    assert high["phase"] == low["phase"] == "Succeeded"
    assert low["completionTime"] >= high["completionTime"]
    # The Job controller lets go of a suspended Job's pods before deleting them: the
    # eviction used none of the Job's backoffLimit.
    assert not train_job(kube, ns, "low").status.failed
    assert "failure" not in low
    # kubetune counts the eviction as a preemption, not as a trainer failure.
    assert (low["preemptions"], low["retries"]) == (1, 0)


def test_dataset_validation_runs_outside_the_queue(
    kube: Kube, ns: str, queue: Callable[..., str]
) -> None:
    """The CPU validation Job carries no queue label: Kueue leaves it alone, so the
    dataset is checked even while the queue is full; only training waits for quota."""
    local_queue = queue(gpus=1)
    ft.create(kube, ns, queued("holder", local_queue, outcome="run"))
    ft.wait_phase(kube, ns, "holder", "Running")
    ft.create(
        kube, ns, queued("checked", local_queue, duration="2s", dataset=ft.BASE_SPEC["dataset"])
    )

    validate = wait_for(
        kube.batch.list_namespaced_job,
        lambda j: True,
        namespace=ns,
        field_selector="metadata.name=checked-validate",
        timeout=ft.TIMEOUT,
        describe="validation job",
    )
    assert QUEUE_LABEL not in (validate.metadata.labels or {})
    assert not validate.spec.suspend
    status = ft.wait_status(
        kube,
        ns,
        "checked",
        lambda s: (ft.condition(s, "DatasetValidated") or {}).get("status") == "True",
        describe="dataset validated",
    )["status"]
    assert status["phase"] in ("Queued", "Pending")
    # Kueue makes a Workload within moments of a Job it manages; the validation Job
    # ran to the end without one.
    owners = {
        ref["name"]
        for workload in kueue_lister(kube, "workloads", ns)()["items"]
        for ref in workload["metadata"].get("ownerReferences") or []
    }
    assert "checked-validate" not in owners

    # Training, though, waits for the GPU.
    ft.wait_phase(kube, ns, "checked", "Queued")
    assert train_job(kube, ns, "checked").spec.suspend is True
    ft.patch_spec(kube, ns, "holder", {"cancel": True})
    assert ft.wait_finished(kube, ns, "checked")["phase"] == "Succeeded"
