"""Building FineTuningJobs and their volumes in tests, and waiting on their status."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import watch

from kubetune.api import GROUP, VERSION
from kubetune.api.trainer import (
    ErrorReport,
    ResultArtifact,
    ResultReport,
    TrainerTermination,
    ValidationReport,
)
from kubetune.dev import simulation
from kubetune.dev.volumes import bound_claim
from tests.support.kube import Kube, wait_for

PLURAL = "finetuningjobs"
TIMEOUT = 60

BASE_SPEC: dict[str, Any] = {
    "baseModel": {
        "name": "kubetune/tiny-llama",
        "volume": {"claimName": "models", "path": "tiny-llama"},
    },
    "dataset": {
        "format": "JSONL",
        "volume": {"claimName": "datasets", "path": "support.jsonl"},
        "fields": {"prompt": "question", "completion": "answer"},
        "preprocessing": [{"type": "filter", "condition": "length > 10"}],
    },
    "method": "LORA",
    "lora": {"rank": 8},
    "hyperparameters": {"epochs": 1, "learningRate": 2.0e-4},
    "output": {"volume": {"claimName": "models", "path": "out"}},
    "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi"},
}

RESULT = ResultReport(
    artifact=ResultArtifact(path="model", kind="adapter", digest="sha256:" + "ab" * 32),
    metrics={"train_loss": 1.234, "eval_loss": 1.5, "perplexity": 4.48},
    dataset_digest="sha256:" + "cd" * 32,
    completed_at=datetime(2026, 11, 25, tzinfo=UTC),
)
VALIDATION = ValidationReport(
    rows_read=120,
    rows_kept=100,
    train_rows=90,
    eval_rows=10,
    tokens=4321,
    digest="sha256:" + "cd" * 32,
)


DELETE = object()  # a value for `changed`: remove the field


def changed(spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `spec` with fields set (or removed, given DELETE); nested fields as
    `parent__child`, e.g. `hyperparameters__learningRate=0.1`."""
    spec = copy.deepcopy(spec)
    for path, value in changes.items():
        node = spec
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return spec


def success_message() -> str:
    """What a trainer that validated and trained would leave as its termination message."""
    return TrainerTermination(validation=VALIDATION, result=RESULT).model_dump_json(
        by_alias=True, exclude_none=True
    )


def error_message(reason: str, message: str) -> str:
    return TrainerTermination(error=ErrorReport(reason=reason, message=message)).model_dump_json(
        by_alias=True
    )


def manifest(
    name: str,
    *,
    outcome: str = "succeed",
    duration: str | None = None,
    exit_code: int | None = None,
    message: str | None = None,
    labels: dict[str, str] | None = None,
    fail_index: int | None = None,
    fail_message: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A FineTuningJob whose pods the simulated nodes run to the given outcome."""
    body_spec = copy.deepcopy(BASE_SPEC)
    body_spec.update(spec)
    succeeds = outcome in ("succeed", "fail-rank")
    annotations = simulation.pod_annotations(
        outcome,
        duration=duration,
        exit_code=exit_code,
        message=success_message() if message is None and succeeds else message,
        fail_index=fail_index,
        fail_message=fail_message,
    )
    pod_metadata = body_spec.setdefault("podMetadata", {})
    pod_metadata.setdefault("annotations", {}).update(annotations)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuningJob",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": body_spec,
    }


def create_volumes(kube: Kube, namespace: str, *claims: str) -> None:
    """Bound PersistentVolumeClaims (simulated nodes never mount them)."""
    for claim in claims or ("models", "datasets"):
        bound_claim(kube.core, namespace, claim, f"/var/lib/kubetune-test/{namespace}-{claim}")
    for claim in claims or ("models", "datasets"):
        wait_for(
            kube.core.list_namespaced_persistent_volume_claim,
            lambda pvc: pvc.status.phase == "Bound",
            namespace=namespace,
            field_selector=f"metadata.name={claim}",
            timeout=TIMEOUT,
            describe=f"PVC {claim} bound",
        )


def create(kube: Kube, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    return kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def get(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def patch_spec(kube: Kube, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
    )


def lister(kube: Kube, namespace: str, plural: str = PLURAL) -> Callable[..., Any]:
    """A list function for custom objects that `wait_for` and kubernetes.watch both accept."""

    def list_custom_objects(**kwargs: Any) -> Any:
        return kube.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, **kwargs
        )

    return list_custom_objects


def wait_status(
    kube: Kube,
    namespace: str,
    name: str,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    describe: str,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """Wait (on a watch) until the FineTuningJob's status satisfies `predicate`."""
    return wait_for(
        lister(kube, namespace),
        lambda obj: predicate(obj.get("status") or {}),
        field_selector=f"metadata.name={name}",
        timeout=timeout,
        describe=f"{name}: {describe}",
    )


def wait_finished(
    kube: Kube, namespace: str, name: str, timeout: float = TIMEOUT
) -> dict[str, Any]:
    """The FineTuningJob's status once it Succeeded or Failed."""
    return wait_status(
        kube,
        namespace,
        name,
        lambda s: s.get("phase") in ("Succeeded", "Failed"),
        describe="finished",
        timeout=timeout,
    )["status"]


def wait_phase(
    kube: Kube, namespace: str, name: str, phase: str, timeout: float = TIMEOUT
) -> dict[str, Any]:
    return wait_status(
        kube,
        namespace,
        name,
        lambda s: s.get("phase") == phase,
        describe=f"phase {phase}",
        timeout=timeout,
    )


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def unfinished_at_once(kube: Kube, namespace: str, stop: threading.Event, seen: list[int]) -> None:
    """How many trials were unfinished at one time, after every event of a watch kept for
    the whole sweep (short watches, so that the thread ends with the test)."""
    phases: dict[str, str] = {}
    resource_version = None
    while not stop.is_set():
        kwargs = {"resource_version": resource_version} if resource_version else {}
        for event in watch.Watch().stream(lister(kube, namespace), timeout_seconds=2, **kwargs):
            obj = event["object"]
            resource_version = obj["metadata"]["resourceVersion"]
            phase = (obj.get("status") or {}).get("phase", "Pending")
            phases[obj["metadata"]["name"]] = "Gone" if event["type"] == "DELETED" else phase
            seen.append(sum(p not in FINISHED for p in phases.values()))


FINISHED = ("Succeeded", "Failed", "Cancelled", "Gone")
