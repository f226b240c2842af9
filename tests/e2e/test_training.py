"""The whole flow for real: kubectl apply, the scheduler, the operator, the trainer
training a tiny model in a pod on the node agent, progress in `kubectl get ftj`,
and a RegisteredModel whose artifact loads and generates text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.api import GROUP, VERSION
from kubetune.dev.cluster import LocalCluster
from tests.support import finetuning as ft
from tests.support.kube import Kube, wait_for, wait_gone

TIMEOUT = 180


def manifest(name: str, method: str, **spec) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuningJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {
                "name": "kubetune/tiny-llama",
                "volume": {"claimName": "models", "path": "tiny-llama"},
            },
            "dataset": {
                "format": "JSONL",
                "volume": {"claimName": "datasets", "path": "train.jsonl"},
                "fields": {"prompt": "question", "completion": "answer"},
                "preprocessing": [{"type": "filter", "condition": "length > 10"}],
                "validationSplit": 0.125,
            },
            "method": method,
            "hyperparameters": {
                "maxSteps": 12,
                "batchSize": 4,
                "gradientAccumulationSteps": 1,
                "maxSeqLength": 128,
                "precision": "fp32",
                "loggingSteps": 2,
                "saveSteps": 6,
                "learningRate": 0.01,
            },
            "output": {"volume": {"claimName": "models", "path": f"out/{name}"}},
            "resources": {"gpus": 1, "cpu": "1", "memory": "2Gi"},
            **spec,
        },
    }
    return body


def kubectl(cluster: LocalCluster, *args: str, input: str | None = None) -> str:
    return cluster.kubectl(*args, input=input)


@pytest.mark.parametrize("method", ["LORA", "FULL", "QLORA", "PREFIX_TUNING", "PROMPT_TUNING"])
def test_each_method_trains_registers_and_generates(
    e2e_cluster: LocalCluster, kube: Kube, ns: str, data_root: Path, method: str
) -> None:
    name = method.lower().replace("_", "-")
    kubectl(e2e_cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(manifest(name, method)))

    seen = ft.wait_status(
        kube,
        ns,
        name,
        lambda s: bool((s.get("progress") or {}).get("steps")),
        describe="progress",
        timeout=TIMEOUT,
    )
    assert seen["status"]["progress"]["totalSteps"] == 12
    done = ft.wait_finished(kube, ns, name, timeout=TIMEOUT)
    assert done["phase"] == "Succeeded", done.get("failure")
    assert done["progress"]["steps"] == "12/12"
    assert ft.condition(done, "DatasetValidated")["reason"] == "DatasetValid"
    table = kubectl(e2e_cluster, "get", "ftj", name, "-n", ns)
    assert "Succeeded" in table and "12/12" in table

    model = kube.custom.get_namespaced_custom_object(
        GROUP, VERSION, ns, "registeredmodels", done["registeredModel"]
    )
    artifact = data_root / "models" / model["spec"]["artifact"]["volume"]["path"]
    assert (artifact / "README.md").is_file()
    assert model["spec"]["artifact"]["digest"].startswith("sha256:")
    assert model["spec"]["metrics"]["eval_loss"] > 0

    assert_generates(artifact, model["spec"]["artifact"]["kind"])


def assert_generates(artifact: Path, kind: str) -> None:
    """The artifact loads and generates, in a fresh process like a user's."""
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "path = sys.argv[1]\n"
        "if sys.argv[2] == 'adapter':\n"
        "    from peft import AutoPeftModelForCausalLM\n"
        "    model = AutoPeftModelForCausalLM.from_pretrained(path)\n"
        "else:\n"
        "    model = AutoModelForCausalLM.from_pretrained(path)\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "ids = tok('what is the capital', return_tensors='pt')\n"
        "out = model.generate(**ids, max_new_tokens=8, do_sample=False)\n"
        "print(len(out[0]) - ids['input_ids'].shape[1])\n"
    )
    generated = subprocess.run(
        [sys.executable, "-c", script, str(artifact), kind],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(generated.stdout.strip().splitlines()[-1]) > 0


def test_two_pods_of_two_processes_train_one_model(
    e2e_cluster: LocalCluster, kube: Kube, ns: str, data_root: Path
) -> None:
    """torchrun on each of two pods (an Indexed Job; the pods meet at pod 0 through the
    headless Service), two CPU processes each: one model, registered once."""
    body = manifest(
        "pair",
        "LORA",
        distributed={"processesPerNode": 2},
        resources={"gpus": 0, "nodes": 2, "cpu": "1", "memory": "2Gi"},
    )
    body["spec"]["hyperparameters"]["batchSize"] = 2
    kubectl(e2e_cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(body))
    done = ft.wait_finished(kube, ns, "pair", timeout=TIMEOUT)
    assert done["phase"] == "Succeeded", done.get("failure")
    assert done["worldSize"] == 4
    used = done["hyperparameters"]
    assert (used["worldSize"], used["distributedStrategy"]) == (4, "ddp")
    assert used["effectiveBatchSize"] == 2 * 1 * 4
    job = kube.batch.read_namespaced_job("pair-train", ns)
    assert job.spec.completion_mode == "Indexed" and job.status.succeeded == 2
    models = kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "registeredmodels")
    [model] = models["items"]
    assert model["spec"]["hyperparameters"]["worldSize"] == 4
    artifact = data_root / "models" / model["spec"]["artifact"]["volume"]["path"]
    assert_generates(artifact, model["spec"]["artifact"]["kind"])


def test_invalid_dataset_fails_fast_with_the_row(
    e2e_cluster: LocalCluster, kube: Kube, ns: str, data_root: Path
) -> None:
    (data_root / "datasets" / "broken.jsonl").write_text(
        '{"question": "ok?", "answer": "yes"}\n{not json\n'
    )
    body = manifest("broken", "LORA")
    body["spec"]["dataset"]["volume"]["path"] = "broken.jsonl"
    body["spec"]["dataset"]["preprocessing"] = []
    kubectl(e2e_cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(body))

    status = ft.wait_phase(kube, ns, "broken", "Failed", timeout=TIMEOUT)["status"]

    assert status["failure"]["reason"] == "InvalidDataset"
    assert "line 2: not valid JSON" in status["failure"]["message"]
    assert [j.metadata.name for j in kube.batch.list_namespaced_job(ns).items] == [
        "broken-validate"
    ]


def test_deleting_a_running_job_stops_the_process(
    e2e_cluster: LocalCluster, kube: Kube, ns: str
) -> None:
    body = manifest("long", "FULL")
    body["spec"]["hyperparameters"]["maxSteps"] = 100000
    body["spec"]["dataset"]["validateFirst"] = False
    kubectl(e2e_cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(body))
    pod = wait_for(
        kube.core.list_namespaced_pod,
        lambda p: p.status.phase == "Running",
        namespace=ns,
        label_selector="kubetune.dev/job-name=long",
        timeout=TIMEOUT,
        describe="trainer running",
    )
    ft.wait_status(
        kube,
        ns,
        "long",
        lambda s: bool((s.get("progress") or {}).get("steps")),
        describe="training",
        timeout=TIMEOUT,
    )

    kubectl(e2e_cluster, "delete", "ftj", "long", "-n", ns, "--wait=false")

    wait_gone(
        kube.core.list_namespaced_pod,
        namespace=ns,
        label_selector="kubetune.dev/job-name=long",
        timeout=120,
        describe="the trainer pod",
    )
    # The agent removes a pod only once its process has exited (SIGTERM, then SIGKILL).
    assert pod.metadata.name not in {
        p.metadata.name for p in kube.core.list_namespaced_pod(ns).items
    }


def test_evaluation_through_the_operator_sdk_and_cli(
    e2e_cluster: LocalCluster, kube: Kube, ns: str, data_root: Path
) -> None:
    """spec.evaluation on the validation split: both models measured in the training pod,
    the results in the status, the condition, the RegisteredModel, the report file next
    to the artifact, the SDK's result and `kubetune get`; loss readable in kubectl."""
    import asyncio

    from click.testing import CliRunner

    from kubetune.cli import main as cli_main
    from kubetune.fine_tuning import ModelFineTuner

    evaluation = {
        "metrics": ["loss", "token_accuracy", "contains", "rouge_l"],
        "generation": {"maxNewTokens": 4},
    }
    body = manifest("evaluated", "LORA", evaluation=evaluation)
    kubectl(e2e_cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(body))
    done = ft.wait_finished(kube, ns, "evaluated", timeout=TIMEOUT)
    assert done["phase"] == "Succeeded", done.get("failure")
    evaluated = ft.condition(done, "Evaluated")
    assert (evaluated["status"], evaluated["reason"]) == ("True", "EvaluationComplete")
    result = done["evaluation"]
    assert set(result["metrics"]) == set(evaluation["metrics"])
    assert result["metrics"]["loss"]["tuned"] < result["metrics"]["loss"]["base"]
    assert done["metrics"]["eval_loss"] == result["metrics"]["loss"]["tuned"]
    assert done["metrics"]["base_eval_contains"] == result["metrics"]["contains"]["base"]
    report = data_root / "models" / result["report"]["path"]
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == result["examples"] > 0
    assert {"prompt", "reference", "base_output", "tuned_output"} <= set(rows[0])

    model = kube.custom.get_namespaced_custom_object(
        GROUP, VERSION, ns, "registeredmodels", done["registeredModel"]
    )
    assert model["spec"]["evaluation"]["metrics"] == result["metrics"]
    assert model["spec"]["evaluation"]["datasetDigest"] == result["datasetDigest"]
    artifact = data_root / "models" / model["spec"]["artifact"]["volume"]["path"]
    assert report.parent == artifact.parent  # next to the model
    assert "## Evaluation" in (artifact / "README.md").read_text()

    # kubectl shows the loss rounded; the full value stays in the status.
    loss = done["progress"]["loss"]
    table = kubectl(e2e_cluster, "get", "ftj", "evaluated", "-n", ns)
    assert f"{loss:.4g}" in table and repr(loss) not in table

    tuner = ModelFineTuner(backend="cluster", kubeconfig=kube.kubeconfig, namespace=ns)
    sdk_result = asyncio.run(tuner.get_fine_tuning_job("evaluated"))
    assert sdk_result.evaluation.metrics["contains"].tuned == result["metrics"]["contains"]["tuned"]
    assert "contains" in sdk_result.evaluation_table()

    shown = CliRunner().invoke(
        cli_main, ["--kubeconfig", str(kube.kubeconfig), "-n", ns, "get", "evaluated"]
    )
    assert shown.exit_code == 0, shown.output
    assert "evaluation:" in shown.output and "rouge_l" in shown.output
    assert "per-example report: pvc://models/" in shown.output
