"""Fixtures for tests on the real local control plane.

One cluster per test session (started here and deleted afterwards, or an
existing one when KUBETUNE_TEST_KUBECONFIG names its kubeconfig), a fresh
namespace per test, and a typed client.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from kubetune.dev.cluster import LocalCluster, cache_dir
from kubetune.dev.processes import OperatorProcess
from kubetune.dev.tools import ensure_tools
from tests.support.kube import Kube

REPO = Path(__file__).resolve().parents[2]

TEST_CLUSTER_PREFIX = "test-"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


def _remove_orphaned_test_clusters() -> None:
    """Delete test clusters left by sessions that were killed before their teardown."""
    clusters = cache_dir() / "kwok" / "clusters"
    if not clusters.is_dir():
        return
    for path in clusters.iterdir():
        match = re.fullmatch(rf"{TEST_CLUSTER_PREFIX}(\d+)(-[a-z]+)?", path.name)
        if match and not _pid_alive(int(match.group(1))):
            LocalCluster(path.name).down()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster | None]:
    """The session's own cluster, or None when KUBETUNE_TEST_KUBECONFIG points at one."""
    if os.environ.get("KUBETUNE_TEST_KUBECONFIG"):
        yield None
        return
    _remove_orphaned_test_clusters()
    cluster = LocalCluster(f"{TEST_CLUSTER_PREFIX}{os.getpid()}")
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def kubeconfig(local_cluster: LocalCluster | None) -> Path:
    if local_cluster is None:
        return Path(os.environ["KUBETUNE_TEST_KUBECONFIG"])
    return local_cluster.kubeconfig


@pytest.fixture(scope="session")
def kube(kubeconfig: Path) -> Kube:
    return Kube.from_kubeconfig(kubeconfig)


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (with everything in it) afterwards."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(name=name, labels={"kubetune.dev/test": "true"})
        )
    )
    try:
        yield name
    finally:
        # Not awaited: the namespace controller finishes the clean-up while
        # later tests run, and the session's cluster is deleted at the end.
        kube.core.delete_namespace(name)


@pytest.fixture(scope="session")
def crds(kubeconfig: Path) -> None:
    """The kubetune CRDs, applied from crds/ exactly as users apply them."""
    kubectl = ensure_tools().kubectl
    subprocess.run(
        [
            str(kubectl),
            "--kubeconfig",
            str(kubeconfig),
            "apply",
            "--server-side",
            "-f",
            str(REPO / "crds"),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            str(kubectl),
            "--kubeconfig",
            str(kubeconfig),
            "wait",
            "--for=condition=Established",
            "crd/finetuningjobs.kubetune.dev",
            "crd/registeredmodels.kubetune.dev",
            "crd/finetuningsweeps.kubetune.dev",
            "crd/modelmerges.kubetune.dev",
            "--timeout=60s",
        ],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def operator(
    kubeconfig: Path, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator, running as its own process for the whole session."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(
        kubeconfig,
        log,
        trainer_image="registry.invalid/kubetune/trainer:test",
        image_pull_timeout="4",
        workers="4",
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
        print(f"operator log: {log}")


@pytest.fixture
def restricted_namespace(kube: Kube, namespace: str) -> str:
    """The test namespace, enforcing the restricted Pod Security Standard."""
    kube.core.patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    return namespace
