"""ModelMerge manifests, built and checked before they are sent: the SDK's
`ModelFineTuner.merge_models` and `kubetune merge create` share them.

The check is the API server's: the schema (through the pydantic models the CRD is
generated from) and the spec's CEL rules, so a refused value is named by its field
before any request. Whether the models can be merged (one base model, LoRA ranks)
only the operator can tell, from their RegisteredModels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from kubetune.api.common import API_VERSION, DNS_SUBDOMAIN, NAME_MAX, VolumeLocation
from kubetune.api.merge import DENSITY_METHODS, KIND, MergeFormat, MergeMethod, ModelMerge
from kubetune.sdk.config import is_pvc, parse_pvc

_NAME_RULE = "lower case letters, digits, '-' and '.', starting and ending alphanumeric"

MergeWeights = Mapping[str, float] | Iterable[tuple[str, float]]


class InvalidMerge(ValueError):
    """A ModelMerge that would be refused: each problem as (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("invalid ModelMerge: " + "; ".join(f"{f}: {m}" for f, m in problems))


def _field(loc: Sequence[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _message(error: dict[str, Any]) -> str:
    if (error.get("ctx") or {}).get("pattern") == DNS_SUBDOMAIN:
        return f"{error['input']!r} is not a valid name ({_NAME_RULE})"
    return error["msg"]


def _rule_problems(merge: ModelMerge) -> list[tuple[str, str]]:
    """The spec's CEL rules, checked here so that the message comes before any request."""
    spec, problems = merge.spec, []
    names = [m.model for m in spec.models]
    if len(set(names)) < len(names):
        problems.append(("spec.models", "each model may be listed once"))
    weights = [m.weight for m in spec.models]
    if spec.method == MergeMethod.SLERP:
        if len(weights) != 2:
            problems.append(("spec.models", "slerp interpolates between exactly two models"))
        elif min(weights) < 0 or max(weights) == 0:
            problems.append(("spec.models", "slerp weights must be non-negative and not both zero"))
    if spec.density is not None and spec.method not in DENSITY_METHODS:
        problems.append(("spec.density", "density applies to ties, dare_linear and dare_ties only"))
    if spec.svd_rank is not None and spec.method != MergeMethod.SVD:
        problems.append(("spec.svdRank", "svdRank applies to the svd method only"))
    if not any(weights):
        problems.append(("spec.models", "at least one weight must be non-zero"))
    path = spec.output.volume.path
    if path.startswith("/"):
        problems.append(("spec.output.volume.path", "path must be relative to the volume root"))
    if ".." in path.split("/"):
        problems.append(("spec.output.volume.path", "path must not contain '..'"))
    return problems


def check_model_merge(manifest: Mapping[str, Any]) -> ModelMerge:
    """The manifest as a ModelMerge, or InvalidMerge naming each field the API server
    would refuse (its schema and its CEL rules)."""
    if not isinstance(manifest, Mapping):
        raise InvalidMerge([("(root)", "a ModelMerge manifest is a mapping")])
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if manifest.get(key, expected) != expected:
            raise InvalidMerge([(key, f"must be {expected}, not {manifest[key]!r}")])
    try:
        merge = ModelMerge.model_validate(manifest)
    except ValidationError as err:
        raise InvalidMerge(
            [(_field(e["loc"]) or "(root)", _message(e)) for e in err.errors()]
        ) from None
    name = (merge.metadata or {}).get("name")
    problems = _rule_problems(merge)
    if not isinstance(name, str) or not name:
        problems.insert(0, ("metadata.name", "a ModelMerge needs a name"))
    elif len(name) > NAME_MAX or not re.fullmatch(DNS_SUBDOMAIN, name):
        problems.insert(0, ("metadata.name", f"{name!r} is not a valid name ({_NAME_RULE})"))
    if problems:
        raise InvalidMerge(problems)
    return merge


def _volume(output: str | VolumeLocation) -> dict[str, Any]:
    if isinstance(output, VolumeLocation):
        return output.to_api()
    if not isinstance(output, str):
        raise InvalidMerge([("spec.output", "give CLAIM, CLAIM:PATH or a VolumeLocation")])
    if is_pvc(output):
        try:
            return parse_pvc(output, "output").to_api()
        except ValueError as err:
            raise InvalidMerge([("spec.output.volume", str(err))]) from None
    claim, _, path = output.partition(":")
    if not claim.strip():
        raise InvalidMerge(
            [
                (
                    "spec.output.volume.claimName",
                    f"output {output!r} names no PersistentVolumeClaim: give CLAIM or CLAIM:PATH",
                )
            ]
        )
    return {"claimName": claim.strip(), "path": path.strip().strip("/")}


def _sources(models: MergeWeights) -> list[dict[str, Any]]:
    pairs = list(models.items()) if isinstance(models, Mapping) else models
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Iterable):
        raise InvalidMerge([("spec.models", "give {model: weight} or [(model, weight), ...]")])
    sources = []
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2):
            raise InvalidMerge(
                [(f"spec.models[{index}]", f"expected a (model, weight) pair, not {pair!r}")]
            )
        sources.append({"model": pair[0], "weight": pair[1]})
    return sources


def merge_manifest(
    name: str,
    models: MergeWeights,
    method: str | MergeMethod = MergeMethod.TIES,
    *,
    output: str | VolumeLocation,
    format: str | MergeFormat | None = None,
    density: float | None = None,
    majority_sign_method: str | None = None,
    svd_rank: int | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """A checked ModelMerge manifest (only the fields given); InvalidMerge names the field
    of any value the API server would refuse."""
    spec: dict[str, Any] = {
        "models": _sources(models),
        "method": str(getattr(method, "value", method)).lower(),
        "output": {"volume": _volume(output)},
    }
    optional = {
        "format": str(getattr(format, "value", format)).lower() if format is not None else None,
        "density": density,
        "majoritySignMethod": majority_sign_method,
        "svdRank": svd_rank,
        "modelName": model_name,
    }
    spec.update({key: value for key, value in optional.items() if value is not None})
    manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}
    check_model_merge(manifest)
    return manifest
