"""A FineTuningSweep for real: a grid of trials that train the tiny model through the
operator, never more than `parallelism` at once, the one with the lowest eval loss
found, every model kept; then a ModelMerge of two trials' adapters run by the operator
in a CPU pod, registered with its lineage and loadable with PEFT."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from click.testing import CliRunner

from kubetune.api import GROUP, VERSION
from kubetune.cli import main as cli_main
from kubetune.dev.cluster import LocalCluster
from kubetune.fine_tuning import ModelFineTuner
from tests.e2e.test_training import manifest
from tests.support import finetuning as ft
from tests.support.kube import Kube

TIMEOUT = 420


def test_grid_search_over_the_learning_rate_then_merge_two_trials(
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
                    "type": "categorical",
                    "values": ["0.0001", "0.003", "0.05"],
                }
            ],
            "algorithm": "grid",
            "objective": {"metric": "eval_loss", "direction": "minimize"},
            "maxTrials": 3,
            "parallelism": 2,
            "modelPolicy": "keepAll",
        },
    }
    stop, seen = threading.Event(), []
    watcher = threading.Thread(
        target=ft.unfinished_at_once, args=(kube, ns, stop, seen), daemon=True
    )
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
            float(tried["hyperparameters.learningRate"])
            == trial["spec"]["hyperparameters"]["learningRate"]
        )
        losses[trial["metadata"]["name"]] = trial["status"]["metrics"]["eval_loss"]
    assert len(set(losses.values())) == 3  # three different learning rates, three results
    rates = sorted(t["spec"]["hyperparameters"]["learningRate"] for t in trials)
    assert rates == [0.0001, 0.003, 0.05]  # the grid, each point once
    best = min(losses, key=losses.get)
    assert done["bestTrial"] == best
    assert done["bestObjective"] == losses[best]
    assert [t["name"] for t in done["trials"]] == ["lr-t0", "lr-t1", "lr-t2"]

    # keepAll: every trial's model, the best one labelled as such.
    models = kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "registeredmodels")
    by_name = {m["metadata"]["name"]: m for m in models["items"]}
    assert sorted(by_name) == ["lr-t0", "lr-t1", "lr-t2"] and done["bestModel"] == best
    assert [
        n for n, m in by_name.items() if "kubetune.dev/sweep-best" in m["metadata"]["labels"]
    ] == [best]
    assert by_name[best]["spec"]["metrics"]["eval_loss"] == losses[best]
    artifact = data_root / "models" / by_name[best]["spec"]["artifact"]["volume"]["path"]
    assert (artifact / "adapter_model.safetensors").is_file()

    table = e2e_cluster.kubectl("get", "fts", "lr", "-n", ns)
    assert "Succeeded" in table and "3/3" in table and best in table
    conditions = {c["type"]: c["status"] for c in done["conditions"]}
    assert conditions == {"Complete": "True", "Failed": "False"}

    def cli(*args: str, command: tuple[str, ...] = ("sweep",)) -> str:
        result = CliRunner().invoke(
            cli_main, ["--kubeconfig", str(kube.kubeconfig), "-n", ns, *command, *args]
        )
        assert result.exit_code == 0, result.output
        return result.output

    shown = cli("get", "lr")
    print(shown)  # the result table, as users see it
    assert f"{best} *" in shown and "hyperparameters.learningRate=" in shown
    assert "lr: Succeeded, trials 3/3" in cli("watch", "lr", "--timeout", "30")
    png = tmp_path / "sweep.png"
    cli("plot", "lr", "-o", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    merge_two_trials(kube, ns, data_root, by_name, tuner, cli)
    table = e2e_cluster.kubectl("get", "mm", "blend", "-n", ns)
    assert "Succeeded" in table and "ties" in table and "blend" in table
    models_table = e2e_cluster.kubectl("get", "rm", "blend", "-n", ns)
    assert "ties" in models_table  # the Merge column


def merge_two_trials(kube: Kube, ns: str, data_root: Path, models: dict, tuner, cli) -> None:
    """A TIES merge of two trials' adapters: the merge pod checks their digests and
    tokenizers, writes one adapter, and the operator registers it with its lineage."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelMerge",
        "metadata": {"name": "blend"},
        "spec": {
            "models": [{"model": "lr-t0", "weight": 1.0}, {"model": "lr-t1", "weight": 1.0}],
            "method": "ties",
            "density": 0.5,
            "output": {"volume": {"claimName": "models", "path": "merged"}},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    assert asyncio.run(tuner.create_model_merge(body)) == "blend"
    merged = asyncio.run(tuner.wait_for_merge("blend", timeout=TIMEOUT))["status"]
    assert merged["phase"] == "Succeeded", merged
    model = kube.custom.get_namespaced_custom_object(
        GROUP, VERSION, ns, "registeredmodels", merged["registeredModel"]
    )
    lineage = model["spec"]["merge"]
    assert lineage["method"] == "ties" and lineage["density"] == 0.5
    assert [(p["name"], p["uid"], p["digest"], p["weight"]) for p in lineage["parents"]] == [
        (
            name,
            models[name]["metadata"]["uid"],
            models[name]["spec"]["artifact"]["digest"],
            1.0,
        )
        for name in ("lr-t0", "lr-t1")
    ]
    assert model["spec"]["artifact"]["digest"] == merged["digest"]
    folder = data_root / "models" / model["spec"]["artifact"]["volume"]["path"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(data_root / "models" / "tiny-llama")
    adapter = PeftModel.from_pretrained(base, folder)
    assert adapter.peft_config["default"].r == models["lr-t0"]["spec"]["adapter"]["lora"]["rank"]

    shown = cli("merge", "get", "blend", command=())
    print(shown)
    assert "Succeeded" in shown and "lr-t0" in shown and "lr-t1" in shown
