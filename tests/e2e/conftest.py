"""End-to-end fixtures: a cluster whose only node runs pods for real (the node
agent), the operator, and volumes holding a tiny model and a dataset.

The trainer really trains here, so these tests take tens of seconds each.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from kubetune.dev.cluster import LocalCluster
from kubetune.dev.processes import OperatorProcess, start_node_agent
from kubetune.dev.volumes import bound_claim
from tests.support.kube import Kube, wait_node_ready
from tests.unit.trainer.conftest import _cached_model

REPO = Path(__file__).resolve().parents[2]
NODE = "local-0"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def e2e_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(f"e2e-{os.getpid()}")
    cluster.up(fleet=[])
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/finetuningjobs.kubetune.dev", "--timeout=60s"
    )
    logs = tmp_path_factory.mktemp("e2e-logs")
    agent = start_node_agent(
        cluster.kubeconfig,
        logs / "node-agent.log",
        name=NODE,
        root=tmp_path_factory.mktemp("pods"),
        gpus=2,
    )
    operator = OperatorProcess(cluster.kubeconfig, logs / "operator.log", workers="2")
    try:
        kube = Kube.from_kubeconfig(cluster.kubeconfig)
        wait_node_ready(kube, NODE)
        operator.start()
        yield cluster
    finally:
        operator.stop()
        agent.terminate()
        agent.wait(timeout=30)
        cluster.down()
        print(f"e2e logs: {logs}")


@pytest.fixture(scope="session")
def kube(e2e_cluster: LocalCluster) -> Kube:
    return Kube.from_kubeconfig(e2e_cluster.kubeconfig)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model and a prompt/completion dataset on disk, as volumes hold them."""
    root = tmp_path_factory.mktemp("volumes")
    shutil.copytree(_cached_model("causal"), root / "models" / "tiny-llama")
    (root / "datasets").mkdir()
    shutil.copy(
        REPO / "examples" / "local" / "data" / "train.jsonl", root / "datasets" / "train.jsonl"
    )
    return root


@pytest.fixture
def ns(kube: Kube, data_root: Path) -> str:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    for claim in ("models", "datasets"):
        bound_claim(kube.core, name, claim, data_root / claim, size="1Gi")
    yield name
    kube.core.delete_namespace(name)
