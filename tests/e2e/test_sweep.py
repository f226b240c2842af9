"""A FineTuningSweep for real: trials that train the tiny model through the operator,
never more than `parallelism` at once, the best one found and its model registered."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from click.testing import CliRunner
from kubernetes import watch

from kubetune.api import GROUP, VERSION
from kubetune.cli import main as cli_main
from kubetune.dev.cluster import LocalCluster
from kubetune.fine_tuning import ModelFineTuner
from tests.e2e.test_training import manifest
from tests.support import finetuning as ft
from tests.support.kube import Kube

TIMEOUT = 420


def running_at_once(kube: Kube, namespace: str, stop: threading.Event, seen: list[int]) -> None:
    """The trials seen unfinished at one time, after every event, from watches kept for
    the whole run (each a few seconds long, so that the thread ends with the test)."""
    phases: dict[str, str] = {}
    while not stop.is_set():
        stream = watch.Watch()
        for event in stream.stream(ft.lister(kube, namespace), timeout_seconds=5):
            obj = event["object"]
            phases[obj["metadata"]["name"]] = (obj.get("status") or {}).get("phase", "Pending")
            seen.append(sum(p not in ("Succeeded", "Failed", "Cancelled") for p in phases.values()))


def test_random_search_over_the_learning_rate(
    e2e_cluster: LocalCluster, kube: Kube, ns: str, data_root: Path, tmp_path: Path
) -> None:
    template = manifest("template", "LORA")["spec"]
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuningSweep",
        "metadata": {"name": "lr"},
        "spec": {
            "template": template,
            "parameters": [
                {
                    "path": "hyperparameters.learningRate",
                    "type": "logUniform",
                    "min": 1e-4,
                    "max": 5e-2,
                }
            ],
            "algorithm": "random",
            "objective": {"metric": "eval_loss", "direction": "minimize"},
            "maxTrials": 3,
            "parallelism": 2,
            "seed": 5,
        },
    }
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=running_at_once, args=(kube, ns, stop, seen), daemon=True)
    watcher.start()
    tuner = ModelFineTuner(backend="cluster", kubeconfig=kube.kubeconfig, namespace=ns)
    assert asyncio.run(tuner.create_sweep(body)) == "lr"
    done = asyncio.run(tuner.wait_for_sweep("lr", timeout=TIMEOUT))["status"]
    stop.set()
    watcher.join(timeout=30)
    assert done["phase"] == "Succeeded", done
    assert done["trialsDone"] == "3/3"
    assert max(seen) <= 2  # parallelism, from the watch

    trials = ft.lister(kube, ns)(label_selector="kubetune.dev/sweep=lr")["items"]
    assert sorted(t["metadata"]["name"] for t in trials) == ["lr-t0", "lr-t1", "lr-t2"]
    losses = {}
    for trial in trials:
        assert trial["metadata"]["ownerReferences"][0]["kind"] == "FineTuningSweep"
        assert trial["status"]["phase"] == "Succeeded"
        tried = json.loads(trial["metadata"]["annotations"]["kubetune.dev/trial-parameters"])
        assert (
            tried["hyperparameters.learningRate"]
            == trial["spec"]["hyperparameters"]["learningRate"]
        )
        losses[trial["metadata"]["name"]] = trial["status"]["metrics"]["eval_loss"]
    assert len(set(losses.values())) == 3  # three different learning rates, three results
    best = min(losses, key=losses.get)
    assert done["bestTrial"] == best
    assert done["bestObjective"] == losses[best]
    assert [t["name"] for t in done["trials"]] == ["lr-t0", "lr-t1", "lr-t2"]

    # bestOnly: one RegisteredModel, the best trial's, labelled as such.
    models = kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "registeredmodels")
    assert [m["metadata"]["name"] for m in models["items"]] == [best] == [done["bestModel"]]
    model = models["items"][0]
    assert model["metadata"]["labels"]["kubetune.dev/sweep-best"] == "true"
    assert model["spec"]["metrics"]["eval_loss"] == losses[best]
    artifact = data_root / "models" / model["spec"]["artifact"]["volume"]["path"]
    assert (artifact / "adapter_model.safetensors").is_file()

    table = e2e_cluster.kubectl("get", "fts", "lr", "-n", ns)
    assert "Succeeded" in table and "3/3" in table and best in table
    conditions = {c["type"]: c["status"] for c in done["conditions"]}
    assert conditions == {"Complete": "True", "Failed": "False"}

    def cli(*args: str) -> str:
        result = CliRunner().invoke(
            cli_main, ["--kubeconfig", str(kube.kubeconfig), "-n", ns, "sweep", *args]
        )
        assert result.exit_code == 0, result.output
        return result.output

    shown = cli("get", "lr")
    assert f"{best} *" in shown and "hyperparameters.learningRate=" in shown
    assert "lr: Succeeded, trials 3/3" in cli("watch", "lr", "--timeout", "30")
    png = tmp_path / "sweep.png"
    cli("plot", "lr", "-o", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
