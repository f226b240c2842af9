"""Builders for FineTuningJob bodies and child objects as the API server returns them."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune.api.finetuningjob import FineTuningJobSpec

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)

SPEC: dict[str, Any] = {
    "baseModel": {"name": "kubetune/tiny-llama", "volume": {"claimName": "models", "path": "tiny"}},
    "dataset": {
        "format": "JSONL",
        "volume": {"claimName": "data", "path": "train.jsonl"},
        "fields": {"prompt": "q", "completion": "a"},
    },
    "method": "LORA",
    "lora": {"rank": 4},
    "output": {"volume": {"claimName": "models", "path": "out/run-1"}},
    "resources": {"gpus": 2, "gpuType": "NVIDIA-A100-SXM4-80GB"},
}


def make_body(spec: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuningJob",
        "metadata": {
            "name": "run-1",
            "namespace": "team-a",
            "uid": "uid-1",
            "generation": 1,
            **metadata,
        },
        "spec": copy.deepcopy(spec or SPEC),
    }


def parse(body: dict[str, Any]) -> FineTuningJobSpec:
    return FineTuningJobSpec.model_validate(body["spec"])


def job(
    name: str,
    *,
    conditions: list[dict] | None = None,
    suspend: bool = False,
    start: bool = False,
    spec_hash: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": conditions or []}
    if start:
        status["startTime"] = "2026-11-25T11:00:00Z"
    annotations = {"kubetune.dev/spec-hash": spec_hash} if spec_hash else {}
    return {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"suspend": suspend, **spec},
        "status": status,
    }


def condition(type_: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-25T11:30:00Z",
    }


def pod(
    name: str,
    phase: str,
    *,
    component: str = "trainer",
    created: str = "2026-11-25T11:00:00Z",
    terminated: dict | None = None,
    waiting: dict | None = None,
    conditions: list[dict] | None = None,
    image: str = "trainer:1",
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if terminated is not None:
        state["terminated"] = terminated
    elif waiting is not None:
        state["waiting"] = waiting
    elif phase == "Running":
        state["running"] = {"startedAt": created}
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "labels": {"app.kubernetes.io/component": component},
        },
        "spec": {"containers": [{"name": "trainer", "image": image}]},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


@pytest.fixture
def body() -> dict[str, Any]:
    return make_body()
