"""A FineTuningSweep on the real control plane with simulated GPU nodes: six random trials
never more than two at once, none extra after the operator is SIGKILLed mid-sweep; and
the median stopping rule cancels a trial that is behind the others, which then counts as
stopped (not failed), and the next trial takes its place."""

from __future__ import annotations

import copy
import threading

import pytest

from kubetune.api import GROUP, VERSION
from kubetune.dev.processes import OperatorProcess
from tests.support import finetuning as ft
from tests.support.kube import Kube, wait_for

pytestmark = pytest.mark.usefixtures("operator")


def sweeps(kube: Kube, namespace: str):
    def list_fn(**kwargs):
        return kube.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "finetuningsweeps", **kwargs
        )

    return list_fn


def report_progress(kube: Kube, namespace: str, name: str, step: int, eval_loss: float) -> None:
    """What the trainer's reports would leave in the trial's status."""
    kube.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "finetuningjobs",
        name,
        {"status": {"progress": {"step": step, "totalSteps": 100, "evalLoss": eval_loss}}},
    )


def test_the_median_rule_stops_the_trial_behind_and_the_next_one_starts(
    kube: Kube, namespace: str
) -> None:
    ft.create_volumes(kube, namespace)
    template = ft.manifest(
        "template",
        outcome="run",  # the trials train until stopped
        dataset={**copy.deepcopy(ft.BASE_SPEC["dataset"]), "validateFirst": False},
    )["spec"]
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuningSweep",
        "metadata": {"name": "stops"},
        "spec": {
            "template": template,
            "parameters": [
                {
                    "path": "hyperparameters.learningRate",
                    "type": "logUniform",
                    "min": 1e-5,
                    "max": 1e-2,
                }
            ],
            "algorithm": "random",
            "objective": {"metric": "eval_loss", "direction": "minimize"},
            "maxTrials": 4,
            "parallelism": 3,
            "earlyStopping": {"minTrials": 2, "minSteps": 1},
        },
    }
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "finetuningsweeps", body)
    for number in range(3):
        ft.wait_phase(kube, namespace, f"stops-t{number}", "Running", timeout=ft.TIMEOUT)
    report_progress(kube, namespace, "stops-t0", 4, 1.0)
    report_progress(kube, namespace, "stops-t1", 4, 1.2)
    report_progress(kube, namespace, "stops-t2", 4, 3.0)

    stopped = ft.wait_status(
        kube, namespace, "stops-t2", lambda s: s.get("phase") == "Cancelled", describe="stopped"
    )
    assert stopped["spec"]["cancel"] is True
    assert stopped["metadata"]["annotations"]["kubetune.dev/stopped-early"] == "true"
    for name in ("stops-t0", "stops-t1"):
        assert not ft.get(kube, namespace, name)["spec"].get("cancel")
    # The stopped trial is not a failure: the search goes on with the next number.
    ft.wait_phase(kube, namespace, "stops-t3", "Running", timeout=ft.TIMEOUT)
    status = wait_for(
        sweeps(kube, namespace),
        lambda obj: any(
            t["name"] == "stops-t2" and t.get("stoppedEarly")
            for t in (obj.get("status") or {}).get("trials") or []
        ),
        timeout=ft.TIMEOUT,
        describe="stopped trial recorded",
    )["status"]
    record = next(t for t in status["trials"] if t["name"] == "stops-t2")
    assert record["history"] == [[4, 3.0]]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "False" and failed["message"] == "0 failed trials so far"


def test_six_random_trials_two_at_a_time_and_a_killed_operator_adds_none(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    ft.create_volumes(kube, namespace)
    template = ft.manifest(
        "template",
        duration="2s",
        dataset={**copy.deepcopy(ft.BASE_SPEC["dataset"]), "validateFirst": False},
    )["spec"]
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuningSweep",
        "metadata": {"name": "six"},
        "spec": {
            "template": template,
            "parameters": [
                {
                    "path": "hyperparameters.learningRate",
                    "type": "logUniform",
                    "min": 1e-5,
                    "max": 1e-2,
                },
                {"path": "lora.rank", "type": "categorical", "values": ["4", "8", "16"]},
            ],
            "algorithm": "random",
            "objective": {"metric": "eval_loss", "direction": "minimize"},
            "maxTrials": 6,
            "parallelism": 2,
        },
    }
    stop, seen = threading.Event(), []
    watcher = threading.Thread(
        target=ft.unfinished_at_once, args=(kube, namespace, stop, seen), daemon=True
    )
    watcher.start()
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "finetuningsweeps", body)
    ft.wait_phase(kube, namespace, "six-t2", "Running", timeout=ft.TIMEOUT)
    operator.kill()  # mid-sweep: no clean-up, nothing kept in memory survives
    operator.start()
    done = wait_for(
        sweeps(kube, namespace),
        lambda obj: (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"),
        field_selector="metadata.name=six",
        timeout=120,
        describe="sweep finished",
    )["status"]
    stop.set()
    watcher.join(timeout=10)
    assert done["phase"] == "Succeeded", done
    assert done["trialsDone"] == "6/6"
    trials = ft.lister(kube, namespace)(label_selector="kubetune.dev/sweep=six")["items"]
    assert sorted(t["metadata"]["name"] for t in trials) == [f"six-t{n}" for n in range(6)]
    assert max(seen) <= 2, "more than `parallelism` trials unfinished at once"
    assert max(seen) == 2  # and it did run two at a time
    tried = {t["metadata"]["annotations"]["kubetune.dev/trial-parameters"] for t in trials}
    assert len(tried) == 6  # six different suggestions, each recorded on its trial
