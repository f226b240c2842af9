"""`make demo`: the whole flow on this machine, with no GPU and no container engine.

Starts the development cluster (real control plane, simulated GPU nodes and
one node agent whose pods run as local processes), the operator, applies
examples/demo/finetuningjob.yaml (LoRA on SmolLM2-135M-Instruct, a real
pretrained model, installed from PyPI and converted once by
kubetune.dev.models), follows its progress live, and ends with the held-out
questions answered by the base model and by the fine-tuned one side by side,
the evaluation's numbers, the RegisteredModel and a loss-curve PNG. The
cluster ("demo") stays up afterwards; `python -m kubetune dev down --name
demo` removes it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from kubernetes import client

from kubetune.api import GROUP, VERSION
from kubetune.dev.cluster import LocalCluster, cache_dir
from kubetune.dev.models import smollm2
from kubetune.dev.nodes import default_fleet
from kubetune.dev.processes import OperatorProcess, python_env, start_node_agent
from kubetune.dev.volumes import bound_claim

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "examples" / "demo" / "finetuningjob.yaml"
DATA = REPO / "examples" / "demo" / "data"
JOB = "quillbox-assistant"
NAMESPACE = "demo"
NODE = "local-0"


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def prepare_volumes(root: Path) -> Path:
    """The base model (converted on first use) and the example dataset; returns the
    folder that the base-models claim exposes (read-only)."""
    base_models = smollm2().parent
    datasets = root / "datasets" / "quillbox"
    datasets.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(DATA / name, datasets / name)
    shutil.rmtree(root / "models" / "out", ignore_errors=True)  # earlier runs' folders
    return base_models


def ensure_namespace(core: client.CoreV1Api, root: Path, base_models: Path) -> None:
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    except client.ApiException as err:
        if err.status != 409:
            raise
    for claim in ("models", "datasets"):
        bound_claim(core, NAMESPACE, claim, root / claim, size="1Gi")
    bound_claim(core, NAMESPACE, "base-models", base_models, size="2Gi")


def side_by_side(report: Path, width: int = 78) -> str:
    """The per-example report as a person reads it: question, then each model's answer."""
    lines = []
    for row in map(json.loads, report.read_text(encoding="utf-8").splitlines()):
        scores = row.get("tuned_scores") or {}
        mark = "ok " if scores.get("contains") else "   "
        lines.append(f"Q: {row['prompt']}")
        lines.append("   base : " + _one_line(row.get("base_output") or "-", width))
        lines.append(f"{mark}tuned: " + _one_line(row.get("tuned_output") or "-", width))
    return "\n".join(lines)


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> None:
    started = time.monotonic()
    root = cache_dir() / "demo"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster("demo")

    say(
        "Starting the local cluster (real kube-apiserver, scheduler, controller-manager; KWOK GPU nodes)"
    )
    # Simulated GPU nodes are tainted: the CPU-only dataset check runs on the real local node.
    cluster.up(fleet=[spec for spec in default_fleet() if spec.gpus])
    cluster.apply_crds(REPO / "crds")
    kubectl = [str(cluster.tools.kubectl), "--kubeconfig", str(cluster.kubeconfig)]
    env = python_env()
    say(f"Starting the node agent ({NODE}: runs its pods as local processes) and the operator")
    agent = start_node_agent(
        cluster.kubeconfig, logs / "node-agent.log", name=NODE, root=root / "pods", gpus=1
    )
    operator = OperatorProcess(cluster.kubeconfig, logs / "operator.log", workers="2")
    try:
        operator.start()
        for condition in ("--for=create", "--for=condition=Ready"):
            subprocess.run(
                [*kubectl, "wait", condition, f"node/{NODE}", "--timeout=60s"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        subprocess.run(
            [*kubectl, "get", "nodes", "-L", "nvidia.com/gpu.product,kubetune.dev/node-pool"],
            check=True,
        )

        say("Preparing the base model, SmolLM2-135M-Instruct (converted once, then cached)")
        base_models = prepare_volumes(root)
        core = client.CoreV1Api(client.ApiClient(_configuration(cluster)))
        ensure_namespace(core, root, base_models)
        custom = client.CustomObjectsApi(core.api_client)
        # A rerun starts over: records outlive their jobs, and a new job may not
        # take over an old job's RegisteredModel name.
        with contextlib.suppress(client.ApiException):
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, "registeredmodels", JOB
            )
        try:
            custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "finetuningjobs", JOB)
            subprocess.run(
                [
                    *kubectl,
                    "wait",
                    "--for=delete",
                    f"ftj/{JOB}",
                    "-n",
                    NAMESPACE,
                    "--timeout=60s",
                ],
                check=False,
                stdout=subprocess.DEVNULL,
            )
        except client.ApiException:
            pass

        say(f"kubectl apply -f {MANIFEST.relative_to(REPO)}")
        subprocess.run([*kubectl, "apply", "-n", NAMESPACE, "-f", str(MANIFEST)], check=True)
        say("Following it (validation in a CPU-only pod, then training)")
        cli = [
            sys.executable,
            "-m",
            "kubetune",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "-n",
            NAMESPACE,
        ]
        subprocess.run([*cli, "watch", JOB, "--timeout", "900"], env=env, check=True)
        subprocess.run([*kubectl, "get", "ftj", "-n", NAMESPACE, "-o", "wide"], check=True)

        job = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "finetuningjobs", JOB)
        status = job["status"]
        report = root / "models" / status["evaluation"]["report"]["path"]
        say("Held-out questions (never in training): the base model, then the fine-tuned one")
        print(side_by_side(report))
        say(f"kubetune get {JOB}: metrics and the evaluation, base vs fine-tuned")
        subprocess.run([*cli, "get", JOB], env=env, check=True)

        model_name = status["registeredModel"]
        say(f"RegisteredModel {model_name} (kubectl get rm {model_name} -n {NAMESPACE} -o yaml)")
        model = custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "registeredmodels", model_name
        )
        record = dict(model["spec"])
        record.pop("serving", None)
        record["hyperparameters"] = {
            k: v for k, v in record["hyperparameters"].items() if k != "decisions"
        }
        print(yaml.safe_dump({"spec": record}, sort_keys=False))

        # The job's own folder on the output volume holds the model and the run's logs.
        output = (root / "models" / model["spec"]["artifact"]["volume"]["path"]).parent
        png = REPO / "out" / "loss-curve.png"
        png.parent.mkdir(exist_ok=True)
        subprocess.run([*cli, "plot", str(output), "-o", str(png)], env=env, check=True)
        minutes, seconds = divmod(int(time.monotonic() - started), 60)
        say(
            f"Done in {minutes}m{seconds:02d}s. Loss curve: {png.relative_to(REPO)}; "
            f"cluster kubeconfig: {cluster.kubeconfig}"
        )
        print(
            "The cluster stays up for a look around (kubectl get ftj,rm -A); "
            "`python -m kubetune dev down --name demo` removes it."
        )
    finally:
        operator.stop()
        agent.terminate()
        agent.wait(timeout=60)


def _configuration(cluster: LocalCluster) -> client.Configuration:
    from kubernetes import config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=configuration)
    return configuration


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as err:
        logs = cache_dir() / "demo" / "logs"
        sys.exit(
            f"\ndemo failed: {' '.join(map(str, err.cmd[:4]))} ... exited with {err.returncode}; see {logs}"
        )
