"""`make demo`: the whole flow on this machine, with no GPU and no container engine.

Starts the development cluster (real control plane, simulated GPU nodes and
one node agent whose pods run as local processes), the operator, applies
examples/demo/finetuningjob.yaml, follows its progress live, and ends with the
RegisteredModel, a sample generation from the trained adapter and a loss-curve
PNG. The cluster ("demo") stays up afterwards; `python -m kubetune dev down
--name demo` removes it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from kubernetes import client

from kubetune.api import GROUP, VERSION
from kubetune.dev.cluster import LocalCluster, cache_dir
from kubetune.dev.nodes import default_fleet
from kubetune.dev.processes import OperatorProcess, python_env, start_node_agent
from kubetune.dev.volumes import bound_claim

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "examples" / "demo" / "finetuningjob.yaml"
NAMESPACE = "demo"
NODE = "local-0"


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def prepare_volumes(root: Path) -> None:
    """A tiny model (built locally, nothing downloaded) and the example dataset."""
    model = root / "models" / "tiny-llama"
    if not (model / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "kubetune_trainer.tiny", str(model)],
            env=python_env(),
            check=True,
        )
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    shutil.copy(
        REPO / "examples" / "local" / "data" / "train.jsonl", root / "datasets" / "train.jsonl"
    )
    shutil.rmtree(root / "models" / "out", ignore_errors=True)  # earlier runs' folders


def ensure_namespace(core: client.CoreV1Api, root: Path) -> None:
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    except client.ApiException as err:
        if err.status != 409:
            raise
    for claim in ("models", "datasets"):
        bound_claim(core, NAMESPACE, claim, root / claim, size="1Gi")


def sample_generation(adapter: Path) -> str:
    script = (
        "import sys\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n"
        "model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "prompt = 'Q: what is the capital of france?\\nA:'\n"
        "ids = tok(prompt, return_tensors='pt')\n"
        "out = model.generate(**ids, max_new_tokens=12, do_sample=False)\n"
        "print(repr(prompt), '->', repr(tok.decode(out[0][ids['input_ids'].shape[1]:], skip_special_tokens=False).strip()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(adapter)],
        env=python_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
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

        prepare_volumes(root)
        core = client.CoreV1Api(client.ApiClient(_configuration(cluster)))
        ensure_namespace(core, root)
        custom = client.CustomObjectsApi(core.api_client)
        # A rerun starts over: records outlive their jobs, and a new job may not
        # take over an old job's RegisteredModel name.
        with contextlib.suppress(client.ApiException):
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, "registeredmodels", "support-bot"
            )
        try:
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, "finetuningjobs", "support-bot"
            )
            subprocess.run(
                [
                    *kubectl,
                    "wait",
                    "--for=delete",
                    "ftj/support-bot",
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
        subprocess.run([*cli, "watch", "support-bot", "--timeout", "900"], env=env, check=True)
        subprocess.run([*kubectl, "get", "ftj", "-n", NAMESPACE, "-o", "wide"], check=True)

        job = custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "finetuningjobs", "support-bot"
        )
        model_name = job["status"]["registeredModel"]
        say(f"RegisteredModel {model_name}")
        model = custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "registeredmodels", model_name
        )
        print(yaml.safe_dump({"spec": model["spec"]}, sort_keys=False))

        # The job's own folder on the output volume holds the model and the run's logs.
        artifact = root / "models" / model["spec"]["artifact"]["volume"]["path"]
        output = artifact.parent
        say("A sample generation from the trained adapter")
        print(sample_generation(artifact))
        png = REPO / "out" / "loss-curve.png"
        png.parent.mkdir(exist_ok=True)
        subprocess.run([*cli, "plot", str(output), "-o", str(png)], env=env, check=True)
        say(f"Done. Loss curve: {png.relative_to(REPO)}; cluster kubeconfig: {cluster.kubeconfig}")
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
