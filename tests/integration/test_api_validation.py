"""The API server itself refuses bad FineTuningJobs, naming the field (schema and CEL rules)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune.dev.tools import ensure_tools
from tests.support import finetuning as ft
from tests.support.kube import Kube

pytestmark = pytest.mark.usefixtures("crds")


def spec_with(**changes: Any) -> dict[str, Any]:
    return ft.changed(ft.BASE_SPEC, **changes)


DELETE = ft.DELETE

INVALID = [
    ("unknown-method", spec_with(method="RLHF"), "spec.method"),
    ("missing-output", spec_with(output=DELETE), "spec.output"),
    ("missing-base-model", spec_with(baseModel=DELETE), "spec.baseModel"),
    (
        "hub-model-without-revision",
        spec_with(baseModel={"name": "meta-llama/Llama-3.2-1B"}),
        "spec.baseModel.revision",
    ),
    ("lora-with-full", spec_with(method="FULL"), "spec.lora"),
    ("quantization-with-lora", spec_with(quantization={"bits": 4}), "spec.quantization"),
    (
        "prefix-settings-with-lora",
        spec_with(prefixTuning={"numVirtualTokens": 10}),
        "spec.prefixTuning",
    ),
    ("zero-rank", spec_with(lora={"rank": 0}), "spec.lora.rank"),
    ("dropout-one", spec_with(lora={"dropout": 1.0}), "spec.lora.dropout"),
    (
        "negative-learning-rate",
        spec_with(hyperparameters__learningRate=-0.1),
        "spec.hyperparameters.learningRate",
    ),
    ("epochs-word", spec_with(hyperparameters__epochs="many"), "spec.hyperparameters.epochs"),
    ("epochs-zero", spec_with(hyperparameters__epochs=0), "spec.hyperparameters.epochs"),
    (
        "batch-too-large",
        spec_with(hyperparameters__batchSize=10_000_000),
        "spec.hyperparameters.batchSize",
    ),
    (
        "validation-split-too-large",
        spec_with(dataset__validationSplit=0.9),
        "spec.dataset.validationSplit",
    ),
    ("jsonl-without-volume", spec_with(dataset__volume=DELETE), "spec.dataset.volume"),
    (
        "huggingface-without-dataset",
        spec_with(dataset__format="HUGGINGFACE", dataset__volume=DELETE),
        "spec.dataset.huggingFace",
    ),
    (
        "custom-loader-is-a-path",
        spec_with(
            dataset__format="CUSTOM",
            dataset__volume=DELETE,
            dataset__custom={"loader": "/tmp/evil.py"},
        ),
        "spec.dataset.custom.loader",
    ),
    (
        "filter-without-condition",
        spec_with(dataset__preprocessing=[{"type": "filter"}]),
        "spec.dataset.preprocessing[0]",
    ),
    (
        "unknown-step-type",
        spec_with(dataset__preprocessing=[{"type": "shuffle"}]),
        "spec.dataset.preprocessing[0].type",
    ),
    (
        "prompt-without-completion",
        spec_with(dataset__fields={"prompt": "q"}),
        "spec.dataset.fields",
    ),
    (
        "path-escapes-volume",
        spec_with(output={"volume": {"claimName": "models", "path": "../etc"}}),
        "spec.output.volume.path",
    ),
    (
        "absolute-path",
        spec_with(output={"volume": {"claimName": "models", "path": "/etc"}}),
        "spec.output.volume.path",
    ),
    ("negative-gpus", spec_with(resources={"gpus": -1}), "spec.resources.gpus"),
    ("bad-memory-quantity", spec_with(resources={"memory": "lots"}), "spec.resources.memory"),
    (
        "merge-prefix-adapter",
        spec_with(
            method="PREFIX_TUNING",
            lora=DELETE,
            output={"volume": {"claimName": "m"}, "mergeAdapter": True},
        ),
        "spec.output.mergeAdapter",
    ),
    (
        "prefix-tuning-with-gradient-checkpointing",
        spec_with(method="PREFIX_TUNING", lora=DELETE, hyperparameters__gradientCheckpointing=True),
        "spec.hyperparameters.gradientCheckpointing",
    ),
    (
        "qlora-with-fsdp",
        spec_with(method="QLORA", distributed={"strategy": "fsdp"}),
        "spec.distributed.strategy",
    ),
    (
        "processes-per-node-with-gpus",
        spec_with(distributed={"processesPerNode": 2}),
        "spec.distributed.processesPerNode",
    ),
    ("zero-nodes", spec_with(resources={"nodes": 0}), "spec.resources.nodes"),
    (
        "unknown-packing-strategy",
        spec_with(hyperparameters__packingStrategy="greedy"),
        "spec.hyperparameters.packingStrategy",
    ),
    ("unknown-field", spec_with(learningRate=0.1), "learningRate"),
    (
        "unknown-evaluation-metric",
        spec_with(evaluation={"metrics": ["bleu"]}),
        "spec.evaluation.metrics[0]",
    ),
    (
        "regex-metric-without-regex",
        spec_with(evaluation={"metrics": ["regex"]}),
        "spec.evaluation.regex",
    ),
    (
        "json-schema-without-metric",
        spec_with(evaluation={"metrics": ["contains"], "jsonSchema": {"type": "object"}}),
        "spec.evaluation.jsonSchema",
    ),
    (
        "evaluation-without-held-out-examples",
        spec_with(dataset__validationSplit=0.0, evaluation={"metrics": ["contains"]}),
        "spec.evaluation",
    ),
    (
        "evaluation-data-without-file",
        spec_with(evaluation={"data": {"format": "JSONL"}}),
        "spec.evaluation.data.volume",
    ),
    (
        "evaluation-zero-new-tokens",
        spec_with(evaluation={"generation": {"maxNewTokens": 0}}),
        "spec.evaluation.generation.maxNewTokens",
    ),
    (
        "evaluation-duplicate-metric",
        spec_with(evaluation={"metrics": ["contains", "contains"]}),
        "spec.evaluation.metrics",
    ),
    (
        "bad-secret-name",
        spec_with(
            baseModel={"name": "org/m", "revision": "abc", "tokenSecretRef": {"name": "Not_Valid"}}
        ),
        "spec.baseModel.tokenSecretRef.name",
    ),
]


@pytest.mark.parametrize(("name", "spec", "field"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_manifest_is_refused_naming_the_field(
    kube: Kube, namespace: str, name: str, spec: dict, field: str
) -> None:
    body = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuningJob",
        "metadata": {"name": name},
        "spec": spec,
    }
    # kubectl, as users apply manifests: strict field validation reports unknown fields.
    kubectl = ensure_tools().kubectl
    result = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kube.kubeconfig), "apply", "-n", namespace, "-f", "-"],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0, f"{name} was accepted"
    assert field in result.stderr, result.stderr
    with pytest.raises(ApiException):
        ft.get(kube, namespace, name)


def test_valid_manifests_are_accepted_with_defaults(kube: Kube, namespace: str) -> None:
    created = ft.create(kube, namespace, ft.manifest("ok"))
    spec = created["spec"]
    assert spec["hyperparameters"]["batchSize"] == "auto"
    assert spec["seed"] == 42
    assert spec["resources"]["gpus"] == 1
    assert spec["dataset"]["validateFirst"] is True
    evaluated = ft.create(
        kube,
        namespace,
        ft.manifest(
            "evaluated",
            evaluation={
                "data": {"format": "JSONL", "volume": {"claimName": "datasets", "path": "e.jsonl"}},
                "metrics": ["contains", "rouge_l", "json_schema"],
                "jsonSchema": {"type": "object", "required": ["answer"]},
            },
        ),
    )["spec"]["evaluation"]
    assert evaluated["compareBase"] is True
    assert evaluated["generation"] == {
        "maxNewTokens": 64,
        "temperature": 0.0,
        "topP": 1.0,
        "batchSize": 8,
    }
    assert evaluated["jsonSchema"] == {"type": "object", "required": ["answer"]}
    # A custom loader's arguments are any JSON values, kept as written.
    args = {"count": 2, "shuffle": True, "splits": ["train", "test"], "name": "x", "opts": {"a": 1}}
    custom = ft.create(
        kube,
        namespace,
        ft.manifest(
            "custom",
            dataset={"format": "CUSTOM", "custom": {"loader": "pkg.mod:load", "args": args}},
        ),
    )["spec"]["dataset"]["custom"]
    assert custom["args"] == args
    for method, extra in [
        ("FULL", {"lora": DELETE}),
        ("QLORA", {"quantization": {"bits": 4, "quantType": "nf4"}}),
        ("PREFIX_TUNING", {"lora": DELETE, "prefixTuning": {"numVirtualTokens": 16}}),
        (
            "PROMPT_TUNING",
            {"lora": DELETE, "promptTuning": {"numVirtualTokens": 8, "initText": "Answer:"}},
        ),
    ]:
        spec = spec_with(method=method, **extra)
        body = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuningJob",
            "metadata": {"name": method.lower().replace("_", "-")},
            "spec": spec,
        }
        ft.create(kube, namespace, body)


def test_kubectl_explain_documents_the_spec(kube: Kube, crds: None) -> None:
    kubectl = ensure_tools().kubectl
    result = subprocess.run(
        [
            str(kubectl),
            "--kubeconfig",
            str(kube.kubeconfig),
            "explain",
            "finetuningjob.spec",
            "--recursive",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    for field in (
        "baseModel",
        "dataset",
        "preprocessing",
        "hyperparameters",
        "lora",
        "resources",
        "registration",
    ):
        assert field in result.stdout
    described = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kube.kubeconfig), "explain", "ftj.spec.lora.rank"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Rank r of the update matrices" in described.stdout
