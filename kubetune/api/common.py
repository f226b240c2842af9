"""Shared pieces of the kubetune.dev API: the model base class and small types.

The API models are the single source of truth: the CRDs in crds/ are
generated from them (`make crds`). Python attributes are snake_case; the
Kubernetes field names are their camelCase aliases.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Bounds that keep CEL cost estimates finite (the API server refuses rules whose
# worst-case cost is unbounded) and objects reasonably small.
NAME_MAX = 253
TEXT_MAX = 4096
LIST_MAX = 64
MAP_MAX = 64

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
RELATIVE_PATH = r"^$|^[^/].*$"


def cel(rule: str, message: str, *, field_path: str | None = None, reason: str | None = None):
    """One `x-kubernetes-validations` entry."""
    entry: dict[str, str] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """json_schema_extra carrying CEL rules for a model or field."""
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The object as Kubernetes stores it (camelCase, unset fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


AUTO = "auto"

AutoInt = Annotated[
    Annotated[int, Field(gt=0, le=1_000_000)] | Literal["auto"],
    Field(json_schema_extra={"x-kubetune-auto-int": True}),
]
"""A positive integer, or "auto" to let the operator derive it."""


class SecretKeyRef(ApiModel):
    """A key of a Secret in the job's namespace. Secrets are only ever referenced:
    the value reaches the trainer's environment through `secretKeyRef` and is
    never copied into a resource, log or event."""

    name: str = Field(description="Name of the Secret.", max_length=NAME_MAX, pattern=DNS_SUBDOMAIN)
    key: str = Field(
        default="token",
        description="Key within the Secret.",
        max_length=NAME_MAX,
        pattern=r"^[-._a-zA-Z0-9]+$",
    )


class VolumeLocation(ApiModel):
    """A file or folder on a PersistentVolumeClaim in the job's namespace."""

    claim_name: str = Field(
        description="Name of the PersistentVolumeClaim.", max_length=NAME_MAX, pattern=DNS_SUBDOMAIN
    )
    path: str = Field(
        default="",
        description="Path inside the volume, relative to its root (empty: the root itself). "
        "Must not contain '..'.",
        max_length=1024,
        json_schema_extra=validations(
            cel("!self.startsWith('/')", "path must be relative to the volume root"),
            cel("!self.split('/').exists(p, p == '..')", "path must not contain '..'"),
        ),
    )


# Conditions are a map keyed by type (server-side apply merges them by type, and
# clients such as kubectl wait and Argo CD find them by type).
CONDITIONS_LIST_MAP = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """One aspect of the object's state, per the Kubernetes API conventions."""

    type: str = Field(description="Type of the condition, e.g. Ready or Succeeded.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="Machine-readable CamelCase reason for the last transition.", max_length=1024
    )
    message: str = Field(default="", description="Human-readable details.", max_length=32768)
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation the condition was set for.", ge=0
    )
