"""The API server refuses bad FineTuningSweeps naming the field: search paths that do
not exist or are not in the template, empty ranges, grids over floats."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubetune.api import GROUP, VERSION
from tests.support import finetuning as ft
from tests.support.kube import Kube

pytestmark = pytest.mark.usefixtures("crds")

LEARNING_RATE = {
    "path": "hyperparameters.learningRate",
    "type": "logUniform",
    "min": 1e-5,
    "max": 1e-2,
}


def sweep(name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "template": copy.deepcopy(ft.BASE_SPEC),
        "parameters": [LEARNING_RATE],
        "objective": {"metric": "eval_loss", "direction": "minimize"},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuningSweep",
        "metadata": {"name": name},
        "spec": body,
    }


def create(kube: Kube, namespace: str, body: dict) -> dict:
    return kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetuningsweeps", body
    )


INVALID = [
    (
        "unknown-path",
        {"parameters": [{**LEARNING_RATE, "path": "hyperparameters.learningRat"}]},
        "spec.parameters[0].path",
    ),
    (
        "resources-are-not-searched",
        {"parameters": [{**LEARNING_RATE, "path": "resources.gpus"}]},
        "spec.parameters[0].path",
    ),
    (
        "section-not-in-template",
        {
            "template": {**copy.deepcopy(ft.BASE_SPEC), "method": "FULL", "lora": None},
            "parameters": [{"path": "lora.rank", "type": "int", "min": 4, "max": 16}],
        },
        "the template has no lora section",
    ),
    (
        "empty-range",
        {"parameters": [{**LEARNING_RATE, "min": 1e-2, "max": 1e-3}]},
        "min must be below max",
    ),
    (
        "log-range-from-zero",
        {"parameters": [{**LEARNING_RATE, "min": 0.0}]},
        "logUniform range must be above 0",
    ),
    (
        "categorical-without-values",
        {"parameters": [{"path": "hyperparameters.lrScheduler", "type": "categorical"}]},
        "categorical takes values",
    ),
    ("grid-over-floats", {"algorithm": "grid"}, "grid search needs int or categorical"),
    ("no-parameters", {"parameters": []}, "spec.parameters"),
    (
        "bad-template",
        {"template": {**copy.deepcopy(ft.BASE_SPEC), "method": "RLHF"}},
        "spec.template.method",
    ),
    ("zero-parallelism", {"parallelism": 0}, "spec.parallelism"),
]


@pytest.mark.parametrize(("name", "changes", "words"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_sweep_is_refused_naming_the_problem(
    kube: Kube, namespace: str, name: str, changes: dict, words: str
) -> None:
    body = sweep(name, **changes)
    if body["spec"]["template"].get("lora", "") is None:
        del body["spec"]["template"]["lora"]
    with pytest.raises(ApiException) as refused:
        create(kube, namespace, body)
    assert refused.value.status == 422
    assert words in refused.value.body, refused.value.body


def test_valid_sweep_is_accepted_with_defaults(kube: Kube, namespace: str) -> None:
    created = create(
        kube,
        namespace,
        sweep(
            "ok",
            parameters=[
                LEARNING_RATE,
                {"path": "lora.rank", "type": "int", "min": 4, "max": 16, "step": 4},
                {
                    "path": "hyperparameters.lrScheduler",
                    "type": "categorical",
                    "values": ["linear", "cosine"],
                },
            ],
        ),
    )["spec"]
    assert created["algorithm"] == "bayesian"
    assert (created["maxTrials"], created["parallelism"], created["maxFailedTrials"]) == (10, 2, 3)
    assert created["modelPolicy"] == "bestOnly"
