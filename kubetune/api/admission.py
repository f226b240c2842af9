"""ValidatingAdmissionPolicies for FineTuningJobs, generated from the API models.

Creating a FineTuningJob makes pods run under the operator's control, so it must
not let a user reach more than they could reach themselves. Two policies, checked
by the API server itself (CEL, no webhook to run or keep available):

* secret references: a job may name a Secret in `tokenSecretRef` only if the
  user creating (or changing) it may `get` that Secret (CEL `authorizer` check);
* trainer images: `spec.image` (of a FineTuningJob or a ModelMerge) must start with one
  of the prefixes an admin lists
  in a ConfigMap (the policy's parameters); a job without `spec.image` runs the
  operator's default image and is not checked.

Both look only at what a request sets or changes: an update that keeps a
reference (the operator's own metadata writes, a label edit by a colleague)
passes, so a job never becomes impossible to update. Field paths are taken from
the models' aliases, so renaming a field changes the policy with it.

`python -m kubetune.api.crd` writes the policies next to the CRDs (crds/policies/
and the chart's files/policies/); bindings and parameters are the chart's, or
`bindings()` and `allowed_images()` here for plain manifests.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from kubetune.api import finetuningjob as ftj
from kubetune.api.common import GROUP

Document = dict[str, Any]

SECRET_POLICY = "kubetune-secret-references"
IMAGE_POLICY = "kubetune-trainer-images"
IMAGE_PREFIXES_KEY = "allowedImagePrefixes"
API = "admissionregistration.k8s.io/v1"


def field_path(model: type[BaseModel], *names: str) -> str:
    """`spec.<alias>.<alias>` for the Python field names given, checked against the model."""
    parts, current = ["spec"], model
    for name in names:
        info = current.model_fields[name]  # KeyError: the field is gone
        parts.append(info.alias or name)
        annotation = info.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
                break
    return ".".join(parts)


def _secret_references() -> list[str]:
    """Every spec field that names a Secret of the job's namespace."""
    return [
        field_path(ftj.FineTuningJobSpec, "base_model", "token_secret_ref"),
        field_path(ftj.FineTuningJobSpec, "dataset", "token_secret_ref"),
    ]


def _has(root: str, path: str) -> str:
    """CEL: every step of `path` is set on `root` (has() takes one field at a time)."""
    steps, checks = path.split("."), []
    for i in range(1, len(steps) + 1):
        checks.append(f"has({root}.{'.'.join(steps[:i])})")
    return " && ".join(checks)


def _variable_name(path: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in path.split(".")[1:-1])  # BaseModel, Dataset


def _match_constraints(resources: list[str]) -> Document:
    return {
        "resourceRules": [
            {
                "apiGroups": [GROUP],
                "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"],
                # Main resources only: status writes never change a reference.
                "resources": resources,
            }
        ]
    }


def _policy(
    name: str, spec: Document, resources: tuple[str, ...] = ("finetuningjobs",)
) -> Document:
    return {
        "apiVersion": API,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "kubetune",
                "app.kubernetes.io/part-of": "kubetune",
            },
        },
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": _match_constraints(list(resources)),
            **spec,
        },
    }


def secret_policy() -> Document:
    variables, validations = [], []
    for path in _secret_references():
        name = _variable_name(path)
        new, old = f"new{name}Secret", f"old{name}Secret"
        variables += [
            {"name": new, "expression": f"{_has('object', path)} ? object.{path}.name : ''"},
            {
                "name": old,
                "expression": f"oldObject != null && {_has('oldObject', path)} "
                f"? oldObject.{path}.name : ''",
            },
        ]
        validations.append(
            {
                "expression": f"variables.{new} == '' || variables.{new} == variables.{old} || "
                "authorizer.group('').resource('secrets')"
                f".namespace(object.metadata.namespace).name(variables.{new})"
                ".check('get').allowed()",
                "messageExpression": f"'{path}: ' + request.userInfo.username + "
                f"' may not get Secret ' + variables.{new} + ' in namespace ' + "
                "object.metadata.namespace + '; name a Secret you can read, or ask for get "
                "rights on it'",
                "reason": "Forbidden",
            }
        )
    return _policy(SECRET_POLICY, {"variables": variables, "validations": validations})


def image_policy() -> Document:
    image = field_path(ftj.FineTuningJobSpec, "image")
    return _policy(
        IMAGE_POLICY,
        {
            "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
            # Only requests that set a new image: jobs on the default image, and updates
            # that keep theirs, are not checked. (The parameters are looked up first: a
            # missing list refuses every request, see bindings().)
            "matchConditions": [
                {
                    "name": "sets-a-new-image",
                    "expression": f"{_has('object', image)} && (oldObject == null || "
                    f"!({_has('oldObject', image)}) || "
                    f"oldObject.{image} != object.{image})",
                }
            ],
            "variables": [
                {
                    "name": "allowed",
                    "expression": f"has(params.data) && '{IMAGE_PREFIXES_KEY}' in params.data ? "
                    f"params.data['{IMAGE_PREFIXES_KEY}'].split('\\n')"
                    ".map(p, p.trim()).filter(p, p != '') : []",
                }
            ],
            "validations": [
                {
                    "expression": f"variables.allowed.exists(p, object.{image}.startsWith(p))",
                    "messageExpression": f"'{image}: ' + object.{image} + ' is not an allowed "
                    "trainer image (allowed prefixes: ' + variables.allowed.join(', ') + "
                    "', set by the cluster admin in ConfigMap ' + params.metadata.namespace + "
                    "'/' + params.metadata.name + '); use an allowed image, or leave "
                    f"{image} out for the operator\\'s default'",
                    "reason": "Forbidden",
                }
            ],
        },
        # A ModelMerge's spec.image runs in its merge pod just as a job's does.
        resources=("finetuningjobs", "modelmerges"),
    )


def policies() -> list[Document]:
    return [secret_policy(), image_policy()]


def bindings(
    params_namespace: str,
    params_name: str,
    *,
    prefix: str = "kubetune",
    namespace_selector: Document | None = None,
) -> list[Document]:
    """One binding per policy, named `<prefix>-secret-references` and
    `<prefix>-trainer-images`; the image policy reads its prefixes from the ConfigMap
    `params_namespace/params_name`. Without that ConfigMap the API server refuses every
    create and update of a FineTuningJob the binding covers (it fails closed; the
    operator writes only status, which is not checked)."""
    match = {"namespaceSelector": namespace_selector} if namespace_selector else {}
    documents = []
    for policy, params in ((SECRET_POLICY, None), (IMAGE_POLICY, True)):
        spec: Document = {"policyName": policy, "validationActions": ["Deny"]}
        if params:
            spec["paramRef"] = {
                "name": params_name,
                "namespace": params_namespace,
                "parameterNotFoundAction": "Deny",
            }
        if match:
            spec["matchResources"] = match
        documents.append(
            {
                "apiVersion": API,
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": f"{prefix}-{policy.removeprefix('kubetune-')}"},
                "spec": spec,
            }
        )
    return documents


def allowed_images(namespace: str, name: str, prefixes: list[str]) -> Document:
    """The image policy's parameters: one prefix per line."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": {IMAGE_PREFIXES_KEY: "\n".join(prefixes)},
    }
