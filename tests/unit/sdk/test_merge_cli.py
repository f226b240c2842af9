"""`kubetune merge` and the SDK's merge calls without a cluster: flags and manifests checked
into a valid ModelMerge before any request, refusals that name the field, and the tables
drawn from a ModelMerge and the RegisteredModel it made."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubetune.api.merge import ModelMerge
from kubetune.api.registeredmodel import RegisteredModel
from kubetune.cli import main
from kubetune.sdk import InvalidMerge, MergeMethod, ModelFineTuner, merge_manifest
from kubetune.sdk.backends import ClusterBackend
from kubetune.sdk.cluster import NotFound

REPO = Path(__file__).resolve().parents[3]
DIGEST_A = "sha256:" + "a1" * 32
DIGEST_B = "sha256:" + "b2" * 32
DIGEST_M = "sha256:" + "c3" * 32
T0 = "2026-01-02T03:04:05Z"


def condition(type_: str, status: str, reason: str, message: str) -> dict:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": T0,
    }


def sample_merge(phase: str = "Succeeded", conditions: list | None = None) -> dict:
    status = {"phase": phase, "conditions": conditions or []}
    if phase == "Succeeded":
        status |= {"registeredModel": "support-both", "digest": DIGEST_M, "jobName": "both-merge"}
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelMerge",
        "metadata": {"name": "both", "namespace": "ml", "uid": "u-1", "creationTimestamp": T0},
        "spec": {
            "models": [
                {"model": "support-a", "weight": 1.0},
                {"model": "support-b", "weight": 0.5},
            ],
            "method": "ties",
            "density": 0.5,
            "format": "adapter",
            "output": {"volume": {"claimName": "models", "path": "merged"}},
            "modelName": "support-both",
        },
        "status": status,
    }


def parent(name: str, digest: str, weight: float) -> dict:
    job = "job-" + name.split("-")[1]
    return {
        "name": name,
        "uid": "u" + name,
        "digest": digest,
        "weight": weight,
        "method": "LORA",
        "sourceJob": job,
    }


def sample_model() -> dict:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "RegisteredModel",
        "metadata": {"name": "support-both", "namespace": "ml", "creationTimestamp": T0},
        "spec": {
            "baseModel": {"name": "org/base", "revision": "abc123"},
            "method": "LORA",
            "adapter": {"lora": {"rank": 16}},
            "artifact": {
                "volume": {"claimName": "models", "path": "merged/both-u"},
                "kind": "adapter",
                "digest": DIGEST_M,
            },
            "merge": {
                "method": "ties",
                "format": "adapter",
                "density": 0.5,
                "majoritySignMethod": "total",
                "parents": [parent("support-a", DIGEST_A, 1.0), parent("support-b", DIGEST_B, 0.5)],
                "source": {"name": "both", "namespace": "ml", "uid": "u-1"},
            },
            "trainerImage": "kubetune/trainer:1",
            "trainedAt": T0,
        },
    }


class FakeCluster:
    namespace = "ml"

    def __init__(self, merges: list[dict] | None = None, models: dict | None = None):
        self.merges = merges or []
        self.models = models or {}
        self.created: list[dict] = []

    def create_merge(self, body: dict) -> dict:
        self.created.append(body)
        return {**body, "metadata": {**body["metadata"], "namespace": self.namespace}}

    def list_merges(self) -> list[dict]:
        return self.merges

    def get_merge(self, name: str) -> dict:
        for merge in self.merges:
            if merge["metadata"]["name"] == name:
                return merge
        raise NotFound(f"ModelMerge {name!r} in namespace ml not found")

    def watch_merge(self, name: str, timeout: float | None = None):
        yield from (m for m in self.merges if m["metadata"]["name"] == name)

    def get_model(self, name: str) -> dict:
        if name not in self.models:
            raise NotFound(f"RegisteredModel {name!r} in namespace ml not found")
        return self.models[name]

    def list_models(self) -> list[dict]:
        return list(self.models.values())


@pytest.fixture
def fake(monkeypatch):
    cluster = FakeCluster()
    monkeypatch.setattr("kubetune.cli_merges._cluster", lambda options: cluster)
    monkeypatch.setattr("kubetune.cli._cluster", lambda options: cluster)
    return cluster


def merge(*args: str):
    return CliRunner().invoke(main, ["merge", *args])


def test_samples_are_valid_api_objects():
    ModelMerge.model_validate(sample_merge())
    RegisteredModel.model_validate(sample_model())


# --- create from flags ------------------------------------------------------------------


def test_flags_make_a_valid_manifest(fake):
    result = merge(
        "create",
        "both",
        "--model",
        "support-a=0.5",
        "--model",
        "support-b=-0.25",
        "--method",
        "TIES",
        "--density",
        "0.3",
        "--output",
        "models:merged/",
        "--model-name",
        "support-both",
    )
    assert result.exit_code == 0, result.output
    assert "modelmerge/both created in namespace ml" in result.output
    (body,) = fake.created
    assert body["spec"] == {
        "models": [
            {"model": "support-a", "weight": 0.5},
            {"model": "support-b", "weight": -0.25},
        ],
        "method": "ties",
        "output": {"volume": {"claimName": "models", "path": "merged"}},
        "density": 0.3,
        "modelName": "support-both",
    }
    assert ModelMerge.model_validate(body).spec.method == MergeMethod.TIES


def test_defaults_weight_one_method_ties_and_the_claim_root(fake):
    result = merge("create", "m", "--model", "a", "--model", "b", "--output", "models")
    assert result.exit_code == 0, result.output
    spec = fake.created[0]["spec"]
    assert [s["weight"] for s in spec["models"]] == [1.0, 1.0]
    assert spec["method"] == "ties" and spec["output"]["volume"] == {
        "claimName": "models",
        "path": "",
    }


def test_global_output_format_still_applies(fake):
    args = ["-o", "json", "merge", "create", "m", "--model", "a", "--model", "b"]
    result = CliRunner().invoke(main, [*args, "--output", "models", "--format", "full"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["spec"]["format"] == "full"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "a=heavy", "--model", "b"], ["--model", "'a=heavy'", "not a number"]),
        (["--model", "=1", "--model", "b"], ["--model", "names no model"]),
        (["--model", "a=11", "--model", "b"], ["--model", "spec.models[0].weight", "10"]),
        (["--model", "a"], ["--model", "two models or more"]),
        (["--model", "a", "--model", "a"], ["--model", "each model may be listed once"]),
        (["--model", "a=0", "--model", "b=0"], ["--model", "at least one weight"]),
        (
            ["--model", "a", "--model", "B_x"],
            ["--model", "spec.models[1].model", "'B_x' is not a valid name"],
        ),
        (["--model", "a", "--model", "b", "--method", "mean"], ["--method", "'mean'"]),
        (["--model", "a", "--model", "b", "--method", "svd", "--density", "0.5"], ["--density"]),
        (["--model", "a", "--model", "b", "--density", "1.5"], ["--density", "spec.density"]),
        (["--model", "a", "--model", "b", "--svd-rank", "8"], ["--svd-rank", "svd method only"]),
        (
            ["--model", "a", "--model", "b", "--model", "c", "--method", "slerp"],
            ["--model", "exactly two models"],
        ),
        (["--model", "a", "--model", "b", "--output", ":merged"], ["--output", "names no"]),
        (["--model", "a", "--model", "b", "--output", "Models"], ["--output", "claimName"]),
        (["--model", "a", "--model", "b", "--output", "m:../up"], ["--output", "'..'"]),
        (["--model", "a", "--model", "b", "--format", "gguf"], ["--format", "'gguf'"]),
    ],
)
def test_bad_flags_are_refused_naming_the_option(fake, args, expected):
    if "--output" not in args:
        args = [*args, "--output", "models"]
    result = merge("create", "m", *args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no stack trace
    for text in expected:
        assert text in result.output, (text, result.output)
    assert fake.created == []


def test_missing_output_and_name(fake):
    result = merge("create", "m", "--model", "a", "--model", "b")
    assert result.exit_code == 2 and "--output" in result.output
    result = merge("create", "--model", "a", "--model", "b", "--output", "models")
    assert result.exit_code == 2 and "give NAME" in result.output
    result = merge("create", "Not_A_Name", "--model", "a", "--model", "b", "--output", "models")
    assert result.exit_code == 2 and "NAME" in result.output and "metadata.name" in result.output


# --- create from a manifest -------------------------------------------------------------


def test_the_example_manifest_is_created(fake):
    example = REPO / "examples" / "merge" / "modelmerge.yaml"
    result = merge("create", "-f", str(example))
    assert result.exit_code == 0, result.output
    (body,) = fake.created
    assert body == yaml.safe_load(example.read_text())
    spec = ModelMerge.model_validate(body).spec
    assert spec.method == MergeMethod.TIES and spec.density == 0.5
    assert [m.weight for m in spec.models] == [1.0, 1.0]


def test_a_bad_manifest_names_its_fields(fake, tmp_path):
    manifest = sample_merge()
    manifest["spec"] |= {"method": "svd", "models": [{"model": "a", "weight": 1.0}]}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = merge("create", "-f", str(path))
    assert (
        result.exit_code == 1 and "spec.models: List should have at least 2 items" in result.output
    )
    manifest = sample_merge()
    manifest["spec"]["method"] = "svd"  # with a density
    manifest.pop("status")
    path.write_text(yaml.safe_dump(manifest))
    result = merge("create", "-f", str(path))
    assert result.exit_code == 1
    assert "spec.density: density applies to ties, dare_linear and dare_ties only" in result.output
    result = merge("create", "-f", str(path), "--model", "x")
    assert result.exit_code == 2 and "either -f" in result.output
    assert fake.created == []


# --- list, get, wait --------------------------------------------------------------------


def test_list(fake):
    pending = sample_merge(
        "Pending", [condition("ModelsReady", "False", "ModelNotFound", "waiting for b")]
    )
    pending["metadata"]["name"] = "later"
    fake.merges = [sample_merge(), pending]
    result = merge("list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "METHOD", "FORMAT", "MODEL", "AGE"]
    assert lines[1].split()[:5] == ["both", "Succeeded", "ties", "adapter", "support-both"]
    assert lines[2].split()[:4] == ["later", "Pending", "ties", "adapter"]
    fake.merges = []
    assert "no ModelMerges in namespace ml" in merge("list").output


def test_get_shows_the_lineage_once_merged(fake):
    fake.merges = [sample_merge()]
    fake.models = {"support-both": sample_model()}
    result = merge("get", "both")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        "both: Succeeded, ties of 2 models (adapter) -> RegisteredModel support-both "
        "(sha256:c3c3c3c3c3c3)"
    )
    assert lines[2].split() == ["MODEL", "WEIGHT", "METHOD", "JOB", "DIGEST"]
    assert lines[3].split() == ["support-a", "1", "LORA", "job-a", "sha256:a1a1a1a1a1a1"]
    assert lines[4].split() == ["support-b", "0.5", "LORA", "job-b", "sha256:b2b2b2b2b2b2"]


def test_get_before_the_merge_shows_why(fake):
    waiting = condition(
        "ModelsReady", "False", "ModelNotFound", "waiting for RegisteredModel support-b"
    )
    fake.merges = [sample_merge("Pending", [waiting])]
    result = merge("get", "both")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        "both: Pending, ties of 2 models (adapter); ModelNotFound: waiting for RegisteredModel "
        "support-b"
    )
    assert lines[2].split() == ["MODEL", "WEIGHT"]
    assert lines[3].split() == ["support-a", "1"]


def test_get_when_the_merged_model_was_deleted(fake):
    fake.merges = [sample_merge()]
    result = merge("get", "both")
    assert result.exit_code == 0, result.output
    assert "RegisteredModel support-both no longer exists" in result.output
    assert merge("get", "nope").exit_code == 1


def test_wait(fake):
    running = sample_merge(
        "Running",
        [
            condition("ModelsReady", "True", "ModelsCompatible", "2 models"),
            condition("Running", "True", "MergeRunning", "Job both-merge merges the models"),
        ],
    )
    fake.merges = [running, sample_merge()]
    result = merge("wait", "both")
    assert result.exit_code == 0, result.output
    assert "MergeRunning: Job both-merge merges the models" in result.output
    assert "both succeeded; registered model: support-both" in result.output
    message = "a and b were fine-tuned from different base models (x and y)"
    fake.merges = [
        sample_merge(
            "Failed",
            [
                condition("ModelsReady", "False", "IncompatibleModels", message),
                condition("Failed", "True", "IncompatibleModels", message),
            ],
        )
    ]
    result = merge("wait", "both")
    assert result.exit_code == 1
    assert f"both failed: IncompatibleModels: {message}" in result.output
    fake.merges = [running]
    result = merge("wait", "both", "--timeout", "1")
    assert result.exit_code == 1 and "still Running after 1.0s" in result.output


def test_models_shows_the_merge_for_merged_models(fake):
    fake.models = {"support-both": sample_model()}
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    row = result.output.splitlines()[1]
    assert "merge both" in row and row.split()[:4] == [
        "support-both",
        "org/base",
        "LORA",
        "adapter",
    ]


def test_merge_commands_without_kubeconfig(no_kubeconfig):
    for args in (["list"], ["get", "x"], ["wait", "x"]):
        result = merge(*args)
        assert result.exit_code == 1 and "no kubeconfig" in result.output, args


# --- SDK ------------------------------------------------------------------------------


def tuner_on(cluster: FakeCluster) -> ModelFineTuner:
    backend = ClusterBackend.__new__(ClusterBackend)
    backend.cluster, backend.namespace = cluster, cluster.namespace
    return ModelFineTuner(backend=backend)


def test_sdk_merge_models():
    cluster = FakeCluster()
    tuner = tuner_on(cluster)
    name = asyncio.run(
        tuner.merge_models(
            "both", [("a", 1.0), ("b", 1.0)], "svd", output="models:m", svd_rank=32, format="full"
        )
    )
    assert name == "both"
    spec = cluster.created[0]["spec"]
    assert spec["method"] == "svd" and spec["svdRank"] == 32 and spec["format"] == "full"
    cluster.merges = [sample_merge()]
    merged = asyncio.run(tuner.wait_for_merge("both"))
    assert merged["status"]["registeredModel"] == "support-both"
    assert asyncio.run(tuner.get_model_merge("both")) is cluster.merges[0]


def test_sdk_refuses_bad_fields_by_name():
    tuner = tuner_on(FakeCluster())
    with pytest.raises(InvalidMerge, match=r"spec\.models\[1\]\.weight"):
        asyncio.run(tuner.merge_models("m", {"a": 1.0, "b": "lots"}, output="models"))
    with pytest.raises(InvalidMerge, match=r"spec\.method: Input should be 'linear'"):
        asyncio.run(tuner.merge_models("m", {"a": 1, "b": 1}, "average", output="models"))
    with pytest.raises(InvalidMerge, match="names no PersistentVolumeClaim"):
        merge_manifest("m", {"a": 1, "b": 1}, output=":x")
    with pytest.raises(InvalidMerge, match=r"spec\.models\[0\]: expected a \(model, weight\)"):
        merge_manifest("m", ["a", "b"], output="models")
    unnamed = sample_merge() | {"metadata": {}}
    with pytest.raises(InvalidMerge, match=r"metadata\.name: a ModelMerge needs a name"):
        asyncio.run(tuner.create_model_merge(unnamed))
    pending = sample_merge("Pending")
    pending["spec"]["method"] = "slerp"
    pending["spec"].pop("density")
    pending["spec"]["models"][1]["weight"] = -1.0
    with pytest.raises(InvalidMerge, match="slerp weights must be non-negative"):
        asyncio.run(tuner.create_model_merge(pending))


def test_sdk_merges_need_a_cluster(tmp_path):
    tuner = ModelFineTuner(backend="local")
    with pytest.raises(ValueError, match="sweeps and merges run on a cluster"):
        asyncio.run(tuner.get_model_merge("x"))
    with pytest.raises(ValueError, match="sweeps and merges run on a cluster"):
        asyncio.run(tuner.merge_models("m", {"a": 1, "b": 1}, output="models"))
