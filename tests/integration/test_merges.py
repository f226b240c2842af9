"""ModelMerge on the real control plane: refused at admission where the spec alone is
wrong, refused with a condition where the parents' records are, waiting for parents not
registered yet, and, on a simulated node, merged into a RegisteredModel whose lineage
lists every parent. Real merges run in tests/e2e and tests/unit/trainer."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune.api import GROUP, VERSION
from kubetune.api.merge import MergeReport
from kubetune.api.trainer import ErrorReport, TrainerTermination
from kubetune.dev import simulation
from tests.support import finetuning as ft
from tests.support.kube import Kube, wait_for

pytestmark = pytest.mark.usefixtures("operator")

MERGES = "modelmerges"
MODELS = "registeredmodels"
DIGEST = "sha256:" + "e" * 64


def registered(name: str, *, rank: int = 8) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RegisteredModel",
        "metadata": {"name": name},
        "spec": {
            "baseModel": ft.BASE_SPEC["baseModel"],
            "method": "LORA",
            "adapter": {"lora": {"rank": rank}},
            "artifact": {
                "volume": {"claimName": "models", "path": f"out/{name}/model"},
                "kind": "adapter",
                "digest": "sha256:" + "a" * 64,
            },
            "sourceJob": {"name": name, "namespace": "x", "uid": f"uid-{name}", "generation": 1},
            "trainerImage": "trainer:1",
            "trainedAt": "2026-12-01T00:00:00Z",
        },
    }


def merge(name: str, models: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelMerge",
        "metadata": {"name": name},
        "spec": {
            "models": [{"model": m, "weight": 0.5} for m in models],
            "method": "ties",
            "output": {"volume": {"claimName": "models", "path": "merged"}},
            **spec,
        },
    }


def create(kube: Kube, namespace: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
    return kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)


def wait_merge(kube: Kube, namespace: str, name: str, predicate, describe: str) -> dict[str, Any]:
    return wait_for(
        ft.lister(kube, namespace, MERGES),
        lambda obj: predicate(obj.get("status") or {}),
        field_selector=f"metadata.name={name}",
        timeout=ft.TIMEOUT,
        describe=f"{name}: {describe}",
    )["status"]


def sim(outcome: str = "succeed", **kwargs: Any) -> dict[str, Any]:
    return {"podMetadata": {"annotations": simulation.pod_annotations(outcome, **kwargs)}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "slerp", "models": [{"model": m} for m in "abc"]}, "exactly two models"),
        ({"method": "linear", "density": 0.5}, "density applies to ties"),
        ({"svdRank": 4}, "svdRank applies to the svd method only"),
        ({"models": [{"model": "a"}, {"model": "a"}]}, "each model may be listed once"),
        ({"models": [{"model": "a", "weight": 0}, {"model": "b", "weight": 0}]}, "non-zero"),
    ],
)
def test_admission_refuses_a_spec_that_cannot_merge(
    kube: Kube, namespace: str, changes, message
) -> None:
    body = merge("bad", ["a", "b"])
    body["spec"] |= changes
    with pytest.raises(ApiException) as refused:
        create(kube, namespace, MERGES, body)
    assert refused.value.status == 422
    assert message in refused.value.body


def test_parents_of_unequal_ranks_are_refused_before_any_pod(kube: Kube, namespace: str) -> None:
    create(kube, namespace, MODELS, registered("r8", rank=8))
    create(kube, namespace, MODELS, registered("r16", rank=16))
    create(kube, namespace, MERGES, merge("uneven", ["r8", "r16"]))
    status = wait_merge(kube, namespace, "uneven", lambda s: s.get("phase") == "Failed", "failed")
    refused = ft.condition(status, "ModelsReady")
    assert refused["status"] == "False" and refused["reason"] == "IncompatibleModels"
    assert "equal LoRA ranks (r8 r=8, r16 r=16): use svd" in refused["message"]
    assert kube.batch.list_namespaced_job(namespace).items == []


def test_a_merge_waits_for_its_models_then_registers_the_lineage(
    kube: Kube, namespace: str
) -> None:
    ft.create_volumes(kube, namespace, "models")
    report = MergeReport(kind="adapter", digest=DIGEST, rank=8, completed_at=datetime.now(UTC))
    message = TrainerTermination(merge=report).model_dump_json(by_alias=True, exclude_none=True)
    create(kube, namespace, MODELS, registered("math"))
    create(kube, namespace, MERGES, merge("blend", ["math", "prose"], **sim(message=message)))

    waiting = wait_merge(kube, namespace, "blend", lambda s: s.get("conditions"), "looked at")
    assert waiting["phase"] == "Pending"
    assert ft.condition(waiting, "ModelsReady")["reason"] == "ModelNotFound"
    assert "prose" in ft.condition(waiting, "ModelsReady")["message"]

    create(kube, namespace, MODELS, registered("prose"))
    status = wait_merge(kube, namespace, "blend", lambda s: s.get("phase") == "Succeeded", "done")
    assert status["registeredModel"] == "blend" and status["digest"] == DIGEST
    assert ft.condition(status, "Ready")["status"] == "True"

    job = kube.batch.read_namespaced_job(status["jobName"], namespace)
    assert job.metadata.owner_references[0].kind == "ModelMerge"
    assert not job.spec.template.spec.containers[0].resources.requests.get("nvidia.com/gpu")

    model = kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, MODELS, "blend")
    lineage = model["spec"]["merge"]
    assert lineage["method"] == "ties" and lineage["density"] == 0.5
    assert [(p["name"], p["weight"], p["digest"]) for p in lineage["parents"]] == [
        ("math", 0.5, "sha256:" + "a" * 64),
        ("prose", 0.5, "sha256:" + "a" * 64),
    ]
    merge_uid = kube.custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, MERGES, "blend"
    )["metadata"]["uid"]
    assert lineage["source"]["uid"] == merge_uid
    assert "sourceJob" not in model["spec"]
    assert model["spec"]["artifact"]["digest"] == DIGEST


def test_a_failed_merge_says_why(kube: Kube, namespace: str) -> None:
    ft.create_volumes(kube, namespace, "models")
    error = ErrorReport(reason="InvalidConfig", message="the tokenizers of a and b differ")
    message = TrainerTermination(error=error).model_dump_json(by_alias=True, exclude_none=True)
    create(kube, namespace, MODELS, registered("a"))
    create(kube, namespace, MODELS, registered("b"))
    create(
        kube,
        namespace,
        MERGES,
        merge("broken", ["a", "b"], **sim("fail", exit_code=64, message=message)),
    )
    status = wait_merge(kube, namespace, "broken", lambda s: s.get("phase") == "Failed", "failed")
    failed = ft.condition(status, "Failed")
    assert failed["reason"] == "InvalidConfig"
    assert failed["message"] == "the tokenizers of a and b differ"
    assert ft.condition(status, "Ready")["status"] == "False"


def test_a_taken_model_name_is_said_before_any_pod_runs(kube: Kube, namespace: str) -> None:
    for name in ("one", "two", "taken"):
        create(kube, namespace, MODELS, registered(name))
    create(kube, namespace, MERGES, merge("late", ["one", "two"], modelName="taken"))
    status = wait_merge(
        kube, namespace, "late", lambda s: ft.condition(s, "Registered"), "registration looked at"
    )
    taken = ft.condition(status, "Registered")
    assert taken["status"] == "False" and taken["reason"] == "NameTaken"
    assert "RegisteredModel taken already records another model" in taken["message"]
    assert status["phase"] == "Pending"
    assert kube.batch.list_namespaced_job(namespace).items == []
