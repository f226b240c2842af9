"""The CRDs are generated from the API models and document every field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.api import crd

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("directory", "render"),
    [(d, crd.rendered) for d in crd.TARGETS]
    + [(d, crd.rendered_policies) for d in crd.POLICY_TARGETS],
)
def test_checked_in_manifests_match_the_models(directory: str, render) -> None:
    """crds/, the admission policies and the Helm chart's copies are all exactly what
    the models generate."""
    generated = render()
    on_disk = {p.name: p.read_text() for p in (ROOT / directory).glob("*.yaml")}
    assert set(on_disk) == set(generated), (
        f"{directory}/ has other files than the models generate: run `make crds`"
    )
    for name, text in generated.items():
        assert on_disk[name] == text, f"{directory}/{name} is stale: run `make crds`"


def _walk(node: dict, path: str):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize(
    "make",
    [crd.finetuningjob_crd, crd.registeredmodel_crd, crd.finetuningsweep_crd, crd.modelmerge_crd],
)
def test_every_field_is_documented_and_structural(make) -> None:
    schema = make()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema, ""):
        if path in (".metadata", ".apiVersion", ".kind"):
            continue
        if not path.endswith("[]") and not path.endswith("{}"):
            assert node.get("description"), f"{path} has no description"
        # Typeless only where any JSON value is allowed (a custom loader's arguments).
        typeless = node.get("x-kubernetes-int-or-string") or (
            node.get("x-kubernetes-preserve-unknown-fields") and path.endswith("args{}")
        )
        assert "type" in node or typeless, f"{path} has no type"
        if node.get("type") == "string" and "enum" not in node and "format" not in node:
            assert "maxLength" in node, f"{path}: unbounded strings make CEL cost unbounded"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list"


def test_auto_fields_are_int_or_string_with_a_rule() -> None:
    spec = crd.finetuningjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"
    ]["spec"]
    epochs = spec["properties"]["hyperparameters"]["properties"]["epochs"]
    assert epochs["x-kubernetes-int-or-string"] is True
    assert epochs["default"] == "auto"
    assert "'auto'" in epochs["x-kubernetes-validations"][0]["rule"]


def test_printer_columns_show_progress_loss_and_eta() -> None:
    columns = {
        c["name"]: c
        for c in crd.finetuningjob_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert columns["Progress"]["jsonPath"] == ".status.progress.steps"
    # Rounded by the operator for display; the full value stays in .status.progress.loss.
    assert columns["Loss"]["jsonPath"] == ".status.progress.display.loss"
    assert columns["Tokens/s"]["jsonPath"] == ".status.progress.display.tokensPerSecond"
    assert columns["ETA"]["jsonPath"] == ".status.progress.eta"
    assert {"Phase", "Method", "Base Model", "Age"} <= set(columns)


def test_spec_is_immutable_once_started_except_suspend_and_cancel() -> None:
    root = crd.finetuningjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    [rule] = root["x-kubernetes-validations"]
    assert "oldSelf.status.startTime" in rule["rule"]
    assert "self.spec.suspend" not in rule["rule"]
    assert "self.spec.cancel" not in rule["rule"]
    assert "self.spec.hyperparameters == oldSelf.spec.hyperparameters" in rule["rule"]


def test_crd_names() -> None:
    names = crd.finetuningjob_crd()["spec"]["names"]
    assert names["shortNames"] == ["ftj"]
    assert crd.finetuningjob_crd()["spec"]["versions"][0]["subresources"] == {"status": {}}
    assert (
        yaml.safe_load(crd.rendered()["finetuningjobs.kubetune.dev.yaml"])["metadata"]["name"]
        == "finetuningjobs.kubetune.dev"
    )
