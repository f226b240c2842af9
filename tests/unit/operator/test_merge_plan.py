"""A ModelMerge's pure parts: which parents can be merged, the merge Job, the lineage."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest
from kubetune_operator import naming
from kubetune_operator.merge_plan import (
    desired_merge_job,
    desired_merged_model,
    incompatibility,
    made_by,
    resolve_parents,
)
from kubetune_operator.settings import OperatorSettings
from pydantic import ValidationError

from kubetune.api import merge as mm
from kubetune.api import registeredmodel as rm

BASE = {"name": "kubetune/tiny-llama", "volume": {"claimName": "models", "path": "tiny-llama"}}


def registered(name: str, *, rank: int = 8, method: str = "LORA", kind: str = "adapter", **base):
    spec = {
        "baseModel": {**BASE, **base},
        "method": method,
        "adapter": {"lora": {"rank": rank}} if method in ("LORA", "QLORA") else {},
        "artifact": {
            "volume": {"claimName": "models", "path": f"out/{name}/model"},
            "kind": kind,
            "digest": "sha256:" + name[0] * 64,
        },
        "sourceJob": {
            "name": f"{name}-job",
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 1,
        },
        "trainerImage": "trainer:1",
        "trainedAt": "2026-12-01T00:00:00Z",
    }
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"rm-{name}"}, "spec": spec}


def merge_body(models=("alpha", "beta"), **spec):
    body_spec = {
        "models": [{"model": m, "weight": 0.5} for m in models],
        "method": "linear",
        "output": {"volume": {"claimName": "merged", "path": "out"}},
        **spec,
    }
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": mm.KIND,
        "metadata": {"name": "blend", "namespace": "ns", "uid": "1234abcd-0000", "generation": 1},
        "spec": body_spec,
    }


def parse(body):
    return mm.ModelMergeSpec.model_validate(body["spec"])


def parents_of(body, *records):
    spec = parse(body)
    found, missing, unreadable = resolve_parents(spec, {r["metadata"]["name"]: r for r in records})
    assert not missing and not unreadable
    return spec, found


def test_missing_and_unreadable_parents_are_told_apart() -> None:
    spec = parse(merge_body(models=("alpha", "beta", "gamma")))
    broken = registered("gamma")
    del broken["spec"]["artifact"]
    found, missing, unreadable = resolve_parents(
        spec, {"alpha": registered("alpha"), "gamma": broken}
    )
    assert [p.name for p in found] == ["alpha"]
    assert missing == ["beta"] and unreadable == ["gamma"]


def test_adapters_of_one_base_and_rank_merge() -> None:
    spec, parents = parents_of(merge_body(), registered("alpha"), registered("beta"))
    assert incompatibility(spec, parents) is None


@pytest.mark.parametrize(
    ("records", "method", "words"),
    [
        (
            [registered("alpha"), registered("beta", volume={"claimName": "other", "path": "m"})],
            "linear",
            ["different base models", "alpha", "beta"],
        ),
        ([registered("alpha"), registered("beta", rank=16)], "ties", ["equal LoRA ranks", "r=16"]),
        (
            [registered("alpha"), registered("beta", method="FULL", kind="full")],
            "linear",
            ["alpha is a LoRA adapter and beta full weights"],
        ),
        (
            [registered("alpha", method="PREFIX_TUNING"), registered("beta")],
            "linear",
            ["PREFIX_TUNING adapter"],
        ),
        ([registered("alpha"), registered("beta")], "slerp", ["use one of linear"]),
        (
            [
                registered("alpha", method="FULL", kind="full"),
                registered("beta", method="FULL", kind="full"),
            ],
            "svd",
            ["these are full weights"],
        ),
    ],
)
def test_incompatible_parents_are_refused_with_the_fix(records, method, words) -> None:
    spec, parents = parents_of(merge_body(method=method), *records)
    problem = incompatibility(spec, parents)
    assert problem is not None
    for word in words:
        assert word in problem


def test_svd_merges_adapters_of_different_ranks() -> None:
    spec, parents = parents_of(
        merge_body(method="svd"), registered("alpha"), registered("beta", rank=16)
    )
    assert incompatibility(spec, parents) is None


def test_one_model_is_no_merge() -> None:
    """The bounds pydantic checks; the CEL rules are checked at admission (integration)."""
    with pytest.raises(ValidationError, match="at least 2"):
        parse(merge_body(models=("alpha",)))


def test_merge_job_reads_parents_and_writes_its_own_folder() -> None:
    body = merge_body(podMetadata={"annotations": {"team": "ml"}})
    spec, parents = parents_of(body, registered("alpha"), registered("beta"))
    job = desired_merge_job(body, spec, parents, OperatorSettings())
    assert job["metadata"]["name"] == naming.merge_job_name("blend")
    assert job["metadata"]["ownerReferences"][0]["kind"] == mm.KIND
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["command"][-2:] == ["--mode", "merge"]
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"models": True, "merged": False}
    annotations = pod["metadata"]["annotations"]
    assert annotations["team"] == "ml" and annotations[naming.ANNOTATION_MERGE] == "blend"
    config = mm.MergeConfig.model_validate_json(annotations[naming.ANNOTATION_TRAINER_CONFIG])
    assert config.base_model == "/mnt/volumes/models/tiny-llama"
    assert [(p.name, p.weight, p.kind) for p in config.parents] == [
        ("alpha", 0.5, "adapter"),
        ("beta", 0.5, "adapter"),
    ]
    assert config.parents[0].path == "/mnt/volumes/models/out/alpha/model"
    assert config.output == "/mnt/volumes/merged/out/blend-1234abcd"


def test_merged_model_records_complete_lineage() -> None:
    body = merge_body(method="ties", density=0.4)
    spec, parents = parents_of(body, registered("alpha"), registered("beta"))
    report = mm.MergeReport(
        kind="adapter",
        digest="sha256:" + "e" * 64,
        rank=8,
        lora_alpha=8,
        target_modules=["v_proj", "q_proj"],
        completed_at=datetime.now(UTC),
    )
    model = desired_merged_model(body, spec, parents, report, "trainer:2")
    record = rm.RegisteredModelSpec.model_validate(model["spec"])
    assert record.source_job is None and record.merge is not None
    lineage = record.merge
    assert lineage.method == mm.MergeMethod.TIES and lineage.density == 0.4
    assert lineage.majority_sign_method == mm.SignMethod.TOTAL
    assert [(p.name, p.uid, p.digest, p.weight, p.source_job) for p in lineage.parents] == [
        ("alpha", "rm-alpha", "sha256:" + "a" * 64, 0.5, "alpha-job"),
        ("beta", "rm-beta", "sha256:" + "b" * 64, 0.5, "beta-job"),
    ]
    assert lineage.source.uid == "1234abcd-0000"
    assert record.artifact.kind == "adapter" and record.artifact.digest == report.digest
    assert record.artifact.volume.path == "out/blend-1234abcd"
    assert record.adapter.lora.rank == 8 and record.method.value == "LORA"
    # As PEFT saved the merged adapter: alpha folded into the weights, the union of modules.
    assert record.adapter.lora.alpha == 8
    assert record.adapter.lora.target_modules == ["q_proj", "v_proj"]
    assert "--lora-modules blend=" in record.serving.vllm
    assert made_by(model, "1234abcd-0000") and not made_by(registered("alpha"), "1234abcd-0000")


def test_adapters_folded_into_full_weights_are_recorded_as_merged() -> None:
    body = merge_body(method="svd", svdRank=16, format="full")
    spec, parents = parents_of(body, registered("alpha"), registered("beta"))
    report = mm.MergeReport(
        kind="full", digest="sha256:" + "f" * 64, completed_at=datetime.now(UTC)
    )
    record = desired_merged_model(body, spec, parents, report, "t")["spec"]
    assert record["method"] == "FULL" and record["artifact"]["kind"] == "merged"
    assert record["merge"]["format"] == "full"
    assert "vllm serve /mnt/volumes/merged/out/blend-1234abcd" in record["serving"]["vllm"]


def test_full_fine_tunes_always_merge_into_full_weights() -> None:
    body = merge_body(method="slerp")
    full = [registered(n, method="FULL", kind="full") for n in ("alpha", "beta")]
    spec, parents = parents_of(body, *full)
    assert incompatibility(spec, parents) is None
    job = desired_merge_job(body, spec, parents, OperatorSettings())
    annotation = job["spec"]["template"]["metadata"]["annotations"][
        naming.ANNOTATION_TRAINER_CONFIG
    ]
    assert json.loads(annotation)["format"] == "full"


def test_full_fine_tunes_cannot_be_asked_for_an_adapter() -> None:
    full = [registered(n, method="FULL", kind="full") for n in ("alpha", "beta")]
    spec, parents = parents_of(merge_body(format="adapter"), *full)
    assert "leave spec.format out, or set it to full" in incompatibility(spec, parents)


def test_qlora_parents_merge_into_an_adapter_for_their_quantised_base() -> None:
    body = merge_body()
    qlora = registered("alpha", method="QLORA")
    qlora["spec"]["adapter"]["quantization"] = {"bits": 4}
    spec, parents = parents_of(body, qlora, registered("beta"))
    report = mm.MergeReport(
        kind="adapter", digest="sha256:" + "e" * 64, rank=8, completed_at=datetime.now(UTC)
    )
    record = desired_merged_model(body, spec, parents, report, "t")["spec"]
    assert record["method"] == "QLORA" and record["adapter"]["quantization"]["bits"] == 4


def test_a_merged_model_can_be_merged_again() -> None:
    body = merge_body()
    spec, parents = parents_of(body, registered("alpha"), registered("beta"))
    report = mm.MergeReport(
        kind="adapter", digest="sha256:" + "e" * 64, rank=8, completed_at=datetime.now(UTC)
    )
    merged = desired_merged_model(body, spec, parents, report, "t")
    merged["metadata"]["uid"] = "rm-blend"
    again = merge_body(models=("blend", "gamma"))
    spec2, parents2 = parents_of(again, copy.deepcopy(merged), registered("gamma"))
    assert incompatibility(spec2, parents2) is None
