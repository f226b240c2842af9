"""Generate the CustomResourceDefinitions from the API models.

Pydantic's JSON Schema is turned into a Kubernetes *structural* schema:
references inlined, optional unions collapsed, "auto" integers made
int-or-string, bounds in OpenAPI v3.0 form, free-form objects marked to keep
unknown fields, CEL rules carried over, and every object given a description
so that `kubectl explain` reads like documentation.

`python -m kubetune.api.crd` rewrites crds/ and the Helm chart's copy in
charts/kubetune/files/crds/, and the admission policies beside them (run by
`make crds`); a test fails when any differs from what this module generates.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.api import admission
from kubetune.api import finetuningjob as ftj
from kubetune.api import merge as mm
from kubetune.api import registeredmodel as rm
from kubetune.api import sweep as sw
from kubetune.api.common import GROUP, LIST_MAX, TEXT_MAX, VERSION

Schema = dict[str, Any]

_DROP = {"title", "additionalProperties", "$defs", "discriminator"}


class SchemaError(ValueError):
    """The model uses a construct that has no structural-schema equivalent."""


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Inline a $ref (pydantic may wrap it in a one-element allOf), keeping sibling keys."""
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**{k: v for k, v in node.items() if k != "allOf"}, **node["allOf"][0]}
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        merged = {**target, **siblings}
        rules = target.get("x-kubernetes-validations", []) + siblings.get(
            "x-kubernetes-validations", []
        )
        if rules:
            merged["x-kubernetes-validations"] = rules
        return merged
    return node


def _auto_int(node: Schema) -> Schema:
    [integer] = [branch for branch in node["anyOf"] if branch.get("type") == "integer"]
    low = integer.get("minimum", integer.get("exclusiveMinimum", 0) + 1)
    high = integer.get("maximum")
    bound = f"self >= {low}" + (f" && self <= {high}" if high is not None else "")
    limits = f"between {low} and {high}" if high is not None else f"at least {low}"
    out: Schema = {
        "x-kubernetes-int-or-string": True,
        "x-kubernetes-validations": [
            {
                "rule": f"type(self) == string ? self == 'auto' : ({bound})",
                "message": f"must be an integer {limits}, or 'auto'",
            }
        ],
    }
    if "default" in node:
        out["default"] = node["default"]
    if "description" in node:
        out["description"] = node["description"]
    return out


def _described(node: Schema) -> Schema:
    return {"description": node["description"]} if "description" in node else {}


def structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """One JSON Schema node as a structural OpenAPI v3 schema node."""
    node = _resolve(node, defs)
    if node.get("x-kubetune-auto-int"):
        return _auto_int(node)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise SchemaError(f"unions other than Optional[X] are not structural: {node['anyOf']}")
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        if outer.get("default", "") is None:
            del outer["default"]
        inner = _resolve(branches[0], defs)
        if "description" in outer:
            inner = {**inner, "description": outer["description"]}
        return structural({**inner, **{k: v for k, v in outer.items() if k != "description"}}, defs)

    out: Schema = {}
    kind = node.get("type")
    if "const" in node:
        out["enum"] = [node["const"]]
        kind = kind or "string"
    if kind is None and "enum" in node:
        kind = "string"
    if kind is None and not set(node) - {"description", "title"}:
        # Any JSON value (JsonValue): the one typeless node a structural schema allows.
        return {"x-kubernetes-preserve-unknown-fields": True, **_described(node)}
    if kind is None:
        raise SchemaError(f"schema node without a type: {node}")
    out["type"] = kind

    if kind == "object":
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        if properties:
            out["properties"] = {name: structural(sub, defs) for name, sub in properties.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
            for name, sub in out["properties"].items():
                # Objects whose fields all have defaults get `{}`, so the API
                # server fills in (and shows) those defaults.
                if (
                    sub.get("type") == "object"
                    and "properties" in sub
                    and "default" not in sub
                    and name not in out.get("required", [])
                    and not sub.get("required")
                    and _is_default_factory(properties[name])
                ):
                    sub["default"] = {}
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs)
            out.setdefault("maxProperties", node.get("maxProperties", 64))
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = structural(node["items"], defs)
        out["maxItems"] = node.get("maxItems", LIST_MAX)
    elif kind == "string" and "enum" not in out and "format" not in node:
        out["maxLength"] = node.get("maxLength", TEXT_MAX)

    for key in ("minimum", "maximum"):
        if key in node:
            out[key] = node[key]
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node:
            out[bound] = node[key]
            out[key] = True
    for key in (
        "minLength",
        "pattern",
        "format",
        "enum",
        "default",
        "description",
        "minItems",
        "maxProperties",
        "x-kubernetes-validations",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
    ):
        if key in node and key not in out:
            out[key] = node[key]
    unknown = (
        set(node)
        - set(out)
        - _DROP
        - {
            "type",
            "properties",
            "required",
            "items",
            "const",
            "maxLength",
            "maxItems",
            "exclusiveMinimum",
            "exclusiveMaximum",
        }
    )
    unknown = {k for k in unknown if not k.startswith("x-kubetune-")}
    if unknown:
        raise SchemaError(f"unsupported JSON Schema keywords {sorted(unknown)} in {node}")
    return out


def _is_default_factory(node: Schema) -> bool:
    """A field of object type that is not Optional (pydantic omits factory defaults)."""
    return "anyOf" not in node and "default" not in node


def model_schema(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def _immutable_once_started(spec: Schema, mutable: set[str]) -> dict[str, str]:
    """Root rule: after training started, only the `mutable` spec fields may change."""
    required = set(spec.get("required", []))
    checks = []
    for name, sub in spec["properties"].items():
        if name in mutable:
            continue
        if name in required or "default" in sub:
            checks.append(f"self.spec.{name} == oldSelf.spec.{name}")
        else:
            checks.append(
                f"(has(self.spec.{name}) ? has(oldSelf.spec.{name}) && self.spec.{name} == "
                f"oldSelf.spec.{name} : !has(oldSelf.spec.{name}))"
            )
    changeable = " and ".join(sorted(mutable))
    return {
        "rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) || ("
        + " && ".join(checks)
        + ")",
        "message": f"spec cannot change once training has started (only {changeable} can): "
        "create a new FineTuningJob instead",
        "reason": "FieldValueForbidden",
    }


def _object_root(spec: Schema, status: Schema | None, description: str) -> Schema:
    properties: Schema = {
        "apiVersion": {"type": "string", "description": "API version: kubetune.dev/v1alpha1."},
        "kind": {"type": "string", "description": "Kind of the object."},
        "metadata": {"type": "object"},
        "spec": spec,
    }
    if status is not None:
        properties["status"] = status
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": properties,
    }


def _crd(
    kind: str,
    plural: str,
    short: str,
    root: Schema,
    columns: list[Schema],
    categories: list[str],
    status: bool,
) -> Schema:
    version: Schema = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": root},
        "additionalPrinterColumns": columns,
    }
    if status:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {
                "app.kubernetes.io/name": "kubetune",
                "app.kubernetes.io/part-of": "kubetune",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": categories,
            },
            "versions": [version],
        },
    }


def _column(
    name: str, path: str, kind: str = "string", priority: int = 0, description: str = ""
) -> Schema:
    column: Schema = {"name": name, "type": kind, "jsonPath": path}
    if priority:
        column["priority"] = priority
    if description:
        column["description"] = description
    return column


def finetuningjob_crd() -> Schema:
    spec = model_schema(ftj.FineTuningJobSpec)
    status = model_schema(ftj.FineTuningJobStatus)
    root = _object_root(spec, status, ftj.FineTuningJob.__doc__ or "")
    root["x-kubernetes-validations"] = [_immutable_once_started(spec, {"suspend", "cancel"})]
    columns = [
        _column("Phase", ".status.phase", description="Summary of the conditions."),
        _column("Method", ".spec.method"),
        _column("Base Model", ".spec.baseModel.name"),
        _column("Progress", ".status.progress.steps", description="Optimizer steps done/planned."),
        _column("Loss", ".status.progress.display.loss", description="Training loss."),
        _column("Tokens/s", ".status.progress.display.tokensPerSecond"),
        _column("ETA", ".status.progress.eta"),
        _column("World", ".status.worldSize", "integer", description="Training processes."),
        _column("Age", ".metadata.creationTimestamp", "date"),
        _column("Eval Loss", ".status.progress.display.evalLoss", priority=1),
        _column("Nodes", ".spec.resources.nodes", "integer", priority=1),
        _column("GPUs", ".spec.resources.gpus", "integer", description="Per pod.", priority=1),
        _column("Model", ".status.registeredModel", priority=1),
        _column("Reason", ".status.failure.reason", priority=1),
    ]
    return _crd(ftj.KIND, ftj.PLURAL, ftj.SHORT_NAME, root, columns, ["kubetune"], status=True)


def registeredmodel_crd() -> Schema:
    spec = model_schema(rm.RegisteredModelSpec)
    spec.setdefault("x-kubernetes-validations", []).append(
        {"rule": "self == oldSelf", "message": "a RegisteredModel's record is immutable"}
    )
    root = _object_root(spec, None, rm.RegisteredModel.__doc__ or "")
    columns = [
        _column("Base Model", ".spec.baseModel.name"),
        _column("Method", ".spec.method"),
        _column("Artifact", ".spec.artifact.kind"),
        _column("Job", ".spec.sourceJob.name"),
        _column("Merge", ".spec.merge.method", description="How it was merged, if it was."),
        _column("Age", ".metadata.creationTimestamp", "date"),
        _column("Digest", ".spec.artifact.digest", priority=1),
        _column("Merged By", ".spec.merge.source.name", priority=1),
    ]
    return _crd(rm.KIND, rm.PLURAL, rm.SHORT_NAME, root, columns, ["kubetune"], status=False)


def finetuningsweep_crd() -> Schema:
    spec = model_schema(sw.FineTuningSweepSpec)
    status = model_schema(sw.FineTuningSweepStatus)
    root = _object_root(spec, status, sw.FineTuningSweep.__doc__ or "")
    columns = [
        _column("Phase", ".status.phase", description="Summary of the conditions."),
        _column("Trials", ".status.trialsDone", description="Ended trials / trials planned."),
        _column("Best", ".status.bestObjectiveShown", description="Best objective so far."),
        _column("Best Trial", ".status.bestTrial"),
        _column("Age", ".metadata.creationTimestamp", "date"),
        _column("Objective", ".spec.objective.metric", priority=1),
        _column("Algorithm", ".spec.algorithm", priority=1),
        _column("Model", ".status.bestModel", priority=1),
    ]
    return _crd(sw.KIND, sw.PLURAL, sw.SHORT_NAME, root, columns, ["kubetune"], status=True)


def modelmerge_crd() -> Schema:
    spec = model_schema(mm.ModelMergeSpec)
    spec.setdefault("x-kubernetes-validations", []).append(
        {"rule": "self == oldSelf", "message": "a ModelMerge's spec is immutable"}
    )
    status = model_schema(mm.ModelMergeStatus)
    root = _object_root(spec, status, mm.ModelMerge.__doc__ or "")
    columns = [
        _column("Phase", ".status.phase", description="Summary of the conditions."),
        _column("Method", ".spec.method"),
        _column("Format", ".spec.format"),
        _column("Model", ".status.registeredModel", description="The merged model."),
        _column("Age", ".metadata.creationTimestamp", "date"),
        _column("Digest", ".status.digest", priority=1),
    ]
    return _crd(mm.KIND, mm.PLURAL, mm.SHORT_NAME, root, columns, ["kubetune"], status=True)


# Where `python -m kubetune.api.crd` writes, relative to the repository root:
# the plain manifests, and the Helm chart's copy (rendered by its templates).
TARGETS = ("crds", "charts/kubetune/files/crds")
# The admission policies of kubetune.api.admission, beside each.
POLICY_TARGETS = ("crds/policies", "charts/kubetune/files/policies")

HEADER = "# Generated from the kubetune.api models by `make crds`. Do not edit.\n"


def _dump(document: Schema) -> str:
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=100, allow_unicode=True)


def rendered() -> dict[str, str]:
    """File name to YAML text for every CRD."""
    return {
        f"{c['metadata']['name']}.yaml": _dump(c)
        for c in (
            finetuningjob_crd(),
            registeredmodel_crd(),
            finetuningsweep_crd(),
            modelmerge_crd(),
        )
    }


def rendered_policies() -> dict[str, str]:
    """File name to YAML text for every ValidatingAdmissionPolicy."""
    return {f"{p['metadata']['name']}.yaml": _dump(p) for p in admission.policies()}


def write(directory: Path, files: dict[str, str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()
    for targets, files in ((TARGETS, rendered()), (POLICY_TARGETS, rendered_policies())):
        for target in targets:
            for path in write(root / target, files):
                print(path)
