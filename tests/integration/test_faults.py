"""The operator under ordinary faults, on the real control plane: names it must not adopt,
a registration name already taken, edits while pods are Pending, suspend before pods
exist, cancel during validation, refused creates, and jobs sharing an output path."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from kubetune.api import GROUP, VERSION
from tests.support import finetuning as ft
from tests.support.kube import Kube, wait_for, wait_gone

pytestmark = pytest.mark.usefixtures("operator")

NO_VALIDATION = {**ft.BASE_SPEC["dataset"], "validateFirst": False}


@pytest.fixture
def ns(kube: Kube, restricted_namespace: str) -> str:
    ft.create_volumes(kube, restricted_namespace)
    return restricted_namespace


def reason_is(type_: str, reason: str):
    return lambda s: (ft.condition(s, type_) or {}).get("reason") == reason


def train_job(kube: Kube, ns: str, name: str):
    found = kube.batch.list_namespaced_job(ns, field_selector=f"metadata.name={name}-train")
    return found.items[0] if found.items else None


def test_children_of_an_earlier_job_of_the_same_name_are_never_adopted(kube: Kube, ns: str) -> None:
    ft.create(kube, ns, ft.manifest("reborn", outcome="run", dataset=NO_VALIDATION))
    ft.wait_phase(kube, ns, "reborn", "Running")
    first = ft.get(kube, ns, "reborn")["metadata"]["uid"]
    # Deleted leaving its children behind (as garbage collection lagging would):
    kube.custom.delete_namespaced_custom_object(
        GROUP, VERSION, ns, "finetuningjobs", "reborn", propagation_policy="Orphan"
    )
    wait_gone(
        ft.lister(kube, ns),
        field_selector="metadata.name=reborn",
        timeout=ft.TIMEOUT,
        describe="the first reborn",
    )
    ft.create(kube, ns, ft.manifest("reborn", dataset=NO_VALIDATION))
    status = ft.wait_status(
        kube, ns, "reborn", reason_is("Running", "NameConflict"), describe="name conflict"
    )["status"]
    assert "does not adopt it" in ft.condition(status, "Running")["message"]
    assert train_job(kube, ns, "reborn").metadata.labels["kubetune.dev/job-uid"] == first

    for old in kube.batch.list_namespaced_job(
        ns, label_selector=f"kubetune.dev/job-uid={first}"
    ).items:
        kube.batch.delete_namespaced_job(old.metadata.name, ns, propagation_policy="Background")

    done = ft.wait_phase(kube, ns, "reborn", "Succeeded")
    second = done["metadata"]["uid"]
    train = train_job(kube, ns, "reborn")
    assert train.metadata.owner_references[0].uid == second
    model = kube.custom.get_namespaced_custom_object(
        GROUP, VERSION, ns, "registeredmodels", "reborn"
    )
    assert model["spec"]["sourceJob"]["uid"] == second


def test_a_taken_registration_name_is_found_before_gpus_are_requested(kube: Kube, ns: str) -> None:
    ft.create(kube, ns, ft.manifest("first", registration={"modelName": "shared"}))
    ft.wait_phase(kube, ns, "first", "Succeeded")

    ft.create(kube, ns, ft.manifest("second", registration={"modelName": "shared"}))
    status = ft.wait_status(
        kube, ns, "second", reason_is("Registered", "NameTaken"), describe="name taken"
    )["status"]
    assert "spec.registration.modelName" in ft.condition(status, "Registered")["message"]
    ft.wait_status(
        kube, ns, "second", reason_is("DatasetValidated", "DatasetValid"), describe="valid"
    )
    assert train_job(kube, ns, "second") is None  # no GPUs were requested

    # The fix the message names is one the API accepts.
    ft.patch_spec(kube, ns, "second", {"registration": {"modelName": "second-model"}})
    done = ft.wait_phase(kube, ns, "second", "Succeeded")["status"]
    assert done["registeredModel"] == "second-model"


def test_an_edit_while_the_pod_is_pending_is_applied(kube: Kube, ns: str) -> None:
    ft.create(kube, ns, ft.manifest("waiting", resources={"gpus": 64}, dataset=NO_VALIDATION))
    ft.wait_status(
        kube, ns, "waiting", reason_is("Running", "Unschedulable"), describe="unschedulable"
    )
    first = train_job(kube, ns, "waiting").metadata.uid
    assert not ft.get(kube, ns, "waiting")["status"].get("startTime")  # edits are allowed

    ft.patch_spec(kube, ns, "waiting", {"resources": {**ft.BASE_SPEC["resources"], "gpus": 1}})
    done = ft.wait_phase(kube, ns, "waiting", "Succeeded")
    assert done["status"]["observedGeneration"] == done["metadata"]["generation"] == 2
    train = train_job(kube, ns, "waiting")
    assert train.metadata.uid != first
    gpus = train.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"]
    assert gpus == "1"
    assert done["status"]["startTime"]


def test_suspend_before_any_pod_keeps_the_job(kube: Kube, ns: str) -> None:
    ft.create(kube, ns, ft.manifest("later", suspend=True, dataset=NO_VALIDATION))
    ft.wait_phase(kube, ns, "later", "Suspended")
    first = train_job(kube, ns, "later").metadata.uid

    ft.patch_spec(kube, ns, "later", {"suspend": False})
    ft.wait_phase(kube, ns, "later", "Succeeded")
    assert train_job(kube, ns, "later").metadata.uid == first  # patched, not replaced


def test_cancel_during_validation_stops_the_validation_pod(kube: Kube, ns: str) -> None:
    ft.create(kube, ns, ft.manifest("abandoned", outcome="run"))
    ft.wait_phase(kube, ns, "abandoned", "Validating")
    wait_for(
        kube.core.list_namespaced_pod,
        lambda p: p.status.phase == "Running",
        namespace=ns,
        label_selector="app.kubernetes.io/component=dataset-validator",
        timeout=ft.TIMEOUT,
        describe="a running validation pod",
    )
    ft.patch_spec(kube, ns, "abandoned", {"cancel": True})
    ft.wait_phase(kube, ns, "abandoned", "Cancelled")
    wait_gone(
        kube.core.list_namespaced_pod,
        namespace=ns,
        label_selector="app.kubernetes.io/component=dataset-validator",
        timeout=ft.TIMEOUT,
        describe="the validation pod",
    )


def test_a_refused_create_is_a_condition_and_an_event(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_resource_quota(
        ns,
        client.V1ResourceQuota(
            metadata=client.V1ObjectMeta(name="no-jobs"),
            spec=client.V1ResourceQuotaSpec(hard={"count/jobs.batch": "0"}),
        ),
    )
    # Admission enforces a quota once its controller has counted the usage.
    wait_for(
        kube.core.list_namespaced_resource_quota,
        lambda q: bool(q.status and q.status.hard),
        namespace=ns,
        field_selector="metadata.name=no-jobs",
        timeout=ft.TIMEOUT,
        describe="the quota in force",
    )
    ft.create(kube, ns, ft.manifest("over-quota"))
    status = ft.wait_status(
        kube, ns, "over-quota", reason_is("Running", "CreateRefused"), describe="refused"
    )["status"]
    message = ft.condition(status, "Running")["message"]
    assert "over-quota-validate" in message and "403" in message and "quota" in message
    wait_for(
        kube.core.list_namespaced_event,
        lambda e: e.reason == "CreateRefused" and e.type == "Warning",
        namespace=ns,
        field_selector="involvedObject.name=over-quota",
        timeout=ft.TIMEOUT,
        describe="the CreateRefused event",
    )
    kube.core.delete_namespaced_resource_quota("no-jobs", ns)
    ft.wait_phase(kube, ns, "over-quota", "Succeeded")


def test_jobs_sharing_an_output_path_get_folders_of_their_own(kube: Kube, ns: str) -> None:
    for name in ("left", "right"):
        ft.create(kube, ns, ft.manifest(name, dataset=NO_VALIDATION))
    outputs, artifacts = set(), set()
    for name in ("left", "right"):
        done = ft.wait_phase(kube, ns, name, "Succeeded")
        job = kube.batch.read_namespaced_job(f"{name}-train", ns)
        config = job.spec.template.metadata.annotations["kubetune.dev/trainer-config"]
        outputs.add(json.loads(config)["paths"]["output"])
        model = kube.custom.get_namespaced_custom_object(
            GROUP, VERSION, ns, "registeredmodels", name
        )
        path = model["spec"]["artifact"]["volume"]["path"]
        assert path == done["status"]["artifact"]["volume"]["path"]
        uid = done["metadata"]["uid"]
        assert path.startswith(f"out/{name}-{uid.split('-')[0]}/")
        artifacts.add(path)
    assert len(outputs) == len(artifacts) == 2
