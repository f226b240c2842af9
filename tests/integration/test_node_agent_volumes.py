"""The node agent's volumes on the real control plane: read-only mounts, downward-API
files and projected service-account tokens, seen from inside the pods it runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune.dev.node_agent import node_manifest
from kubetune.dev.pod_volumes import mount_namespace
from kubetune.dev.processes import start_node_agent
from kubetune.dev.volumes import bound_claim
from tests.support.kube import Kube, wait_for, wait_node_ready

NODE = "volumes-0"
CONFIG_ANNOTATION = "kubetune.dev/trainer-config"
AUDIENCE = "kubetune-operator"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"


@pytest.fixture(scope="module")
def agent_root(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A node agent serving one cordoned Node: only pods bound to it by name run there."""
    node = node_manifest(NODE, cpu=2, memory="4Gi", gpus=0)
    node["spec"] = {"unschedulable": True}
    kube.core.create_node(node)
    root = tmp_path_factory.mktemp("agent-pods")
    log = root.parent / "volumes-node-agent.log"
    agent = start_node_agent(kube.kubeconfig, log, name=NODE, root=root, gpus=0)
    try:
        wait_node_ready(kube, NODE)
        yield root
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        kube.core.delete_node(NODE)
        print(f"node agent log: {log}")


@pytest.fixture
def agent_namespace(kube: Kube, namespace: str, agent_root: Path) -> str:
    """The test namespace, once its default service account exists (pods need it)."""
    wait_for(
        kube.core.list_namespaced_service_account,
        lambda account: True,
        namespace=namespace,
        field_selector="metadata.name=default",
        timeout=60,
        describe="the default service account",
    )
    return namespace


def pod_manifest(
    name: str,
    command: list[str],
    *,
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **spec.pop("metadata", {})},
        "spec": {
            "nodeName": NODE,
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "local", "command": command, "volumeMounts": mounts}
            ],
            "volumes": volumes,
            **spec,
        },
    }


def finished(kube: Kube, namespace: str, name: str) -> client.V1ContainerStateTerminated:
    pod = wait_for(
        kube.core.list_namespaced_pod,
        lambda p: p.status.phase in ("Succeeded", "Failed"),
        namespace=namespace,
        field_selector=f"metadata.name={name}",
        timeout=90,
        describe=f"pod {name} finished",
    )
    return pod.status.container_statuses[0].state.terminated


def claim_volume(claim: str) -> dict[str, Any]:
    return {"name": "data", "persistentVolumeClaim": {"claimName": claim}}


def test_a_read_only_mount_refuses_writes_a_writable_mount_of_the_same_folder_makes(
    kube: Kube, agent_namespace: str, tmp_path: Path
) -> None:
    if mount_namespace() is None:
        pytest.skip("this machine cannot bind-mount in a private mount namespace")
    shared = tmp_path / "shared"
    bound_claim(kube.core, agent_namespace, "shared", shared)
    # The reader is up, read-only view in place, while the writer writes: the
    # reader sees the writer's file in the same folder yet cannot add its own.
    reader = (
        "i=0; while [ ! -e /data/from-writer ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
        "cat /data/from-writer > /dev/termination-log; "
        "touch /data/from-reader 2>> /dev/termination-log"
    )
    kube.core.create_namespaced_pod(
        agent_namespace,
        pod_manifest(
            "reader",
            ["sh", "-c", reader],
            volumes=[claim_volume("shared")],
            mounts=[{"name": "data", "mountPath": "/data", "readOnly": True}],
        ),
    )
    kube.core.create_namespaced_pod(
        agent_namespace,
        pod_manifest(
            "writer",
            ["sh", "-c", "echo written > /data/from-writer"],
            volumes=[claim_volume("shared")],
            mounts=[{"name": "data", "mountPath": "/data"}],
        ),
    )

    writer = finished(kube, agent_namespace, "writer")
    assert writer.exit_code == 0, writer
    reader_state = finished(kube, agent_namespace, "reader")
    assert reader_state.exit_code == 1, reader_state
    assert reader_state.message.startswith("written\n")
    assert "Read-only file system" in reader_state.message
    assert (shared / "from-writer").read_text() == "written\n"
    assert not (shared / "from-reader").exists()


def test_a_downward_api_annotation_file_names_the_local_folders(
    kube: Kube, agent_namespace: str, agent_root: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    bound_claim(kube.core, agent_namespace, "data", data)
    trainer_config = {
        "dataset": "/data/train.jsonl",
        "output_dir": "/output/run-1",
        "note": "/datasets is not mounted",
    }
    report = (
        "import json, os, pathlib\n"
        "config = pathlib.Path('/etc/kubetune')\n"
        "pathlib.Path('/dev/termination-log').write_text(json.dumps({\n"
        "    'config': json.loads((config / 'config.json').read_text()),\n"
        "    'labels': (config / 'labels').read_text(),\n"
        "    'mode': os.stat(config / 'config.json').st_mode & 0o777,\n"
        "}))\n"
    )
    field = {"fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}}
    kube.core.create_namespaced_pod(
        agent_namespace,
        pod_manifest(
            "trainer",
            ["python", "-c", report],
            metadata={
                "labels": {"app": "trainer", "kubetune.dev/job": "demo"},
                "annotations": {CONFIG_ANNOTATION: json.dumps(trainer_config)},
            },
            volumes=[
                claim_volume("data"),
                {"name": "output", "emptyDir": {}},
                {
                    "name": "config",
                    "downwardAPI": {
                        "items": [
                            {"path": "config.json", "mode": 0o440, **field},
                            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                        ]
                    },
                },
            ],
            mounts=[
                {"name": "data", "mountPath": "/data", "readOnly": True},
                {"name": "output", "mountPath": "/output"},
                {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True},
            ],
        ),
    )

    state = finished(kube, agent_namespace, "trainer")
    assert state.exit_code == 0, state
    seen = json.loads(state.message)
    assert seen["config"]["dataset"] == f"{data}/train.jsonl"
    output = Path(seen["config"]["output_dir"])
    assert output.name == "run-1" and output.parent.name == "output"
    assert output.is_relative_to(agent_root / agent_namespace)
    assert seen["config"]["note"] == "/datasets is not mounted"
    assert seen["labels"] == 'app="trainer"\nkubetune.dev/job="demo"'
    assert seen["mode"] == 0o440


def operator_token_volume() -> dict[str, Any]:
    return {
        "name": "operator-token",
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": AUDIENCE,
                        "expirationSeconds": 600,
                        "path": "token",
                    }
                },
                {
                    "downwardAPI": {
                        "items": [{"path": "pod-name", "fieldRef": {"fieldPath": "metadata.name"}}]
                    }
                },
            ]
        },
    }


REPORT_TOKENS = (
    "import json, os, pathlib, yaml\n"
    "folder = pathlib.Path('/var/run/secrets/kubetune')\n"
    "kubeconfig = os.environ.get('KUBECONFIG')\n"
    "api_token = None\n"
    "if kubeconfig:\n"
    "    user = yaml.safe_load(pathlib.Path(kubeconfig).read_text())['users'][0]['user']\n"
    "    api_token = pathlib.Path(user['tokenFile']).read_text()\n"
    "pathlib.Path('/dev/termination-log').write_text(json.dumps({\n"
    "    'token': (folder / 'token').read_text(),\n"
    "    'pod_name': (folder / 'pod-name').read_text(),\n"
    "    'kubeconfig': kubeconfig,\n"
    "    'api_token': api_token,\n"
    "}))\n"
)


def review(kube: Kube, token: str, audiences: list[str] | None) -> client.V1TokenReviewStatus:
    body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
    return client.AuthenticationV1Api(kube.api).create_token_review(body).status


def test_a_projected_token_for_another_audience_is_valid_there_but_not_the_pods_credential(
    kube: Kube, agent_namespace: str
) -> None:
    mounts = [{"name": "operator-token", "mountPath": "/var/run/secrets/kubetune"}]
    # "with-api-access" also gets the API-access volume the ServiceAccount
    # admission plugin adds; "without-api-access" opts out of it.
    pods = (("with-api-access", True), ("without-api-access", False))
    for name, automount in pods:
        kube.core.create_namespaced_pod(
            agent_namespace,
            pod_manifest(
                name,
                ["python", "-c", REPORT_TOKENS],
                volumes=[operator_token_volume()],
                mounts=mounts,
                automountServiceAccountToken=automount,
            ),
        )

    for name, automount in pods:
        state = finished(kube, agent_namespace, name)
        assert state.exit_code == 0, state
        seen = json.loads(state.message)
        assert seen["pod_name"] == name

        operator_view = review(kube, seen["token"], [AUDIENCE])
        assert operator_view.authenticated, operator_view
        assert operator_view.user.username == f"system:serviceaccount:{agent_namespace}:default"
        assert operator_view.user.extra[POD_NAME_EXTRA] == [name]
        assert operator_view.audiences == [AUDIENCE]
        # Not a token for the API server: it must not be the process's credential.
        assert not review(kube, seen["token"], None).authenticated

        if automount:
            assert seen["kubeconfig"] and seen["api_token"] != seen["token"]
            api_view = review(kube, seen["api_token"], None)
            assert api_view.authenticated, api_view
            assert api_view.user.extra[POD_NAME_EXTRA] == [name]
        else:
            assert seen["kubeconfig"] is None


def test_a_pod_without_a_command_fails_to_start(kube: Kube, agent_namespace: str) -> None:
    """The agent cannot run an image's entrypoint; the pod says so instead of hanging."""
    kube.core.create_namespaced_pod(
        agent_namespace, pod_manifest("no-command", [], volumes=[], mounts=[])
    )
    state = finished(kube, agent_namespace, "no-command")
    assert state.reason == "StartError" and "no command" in state.message
