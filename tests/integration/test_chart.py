"""The Helm chart on the local control plane, with the real helm and kubectl binaries.

The kubetune CRDs are shared by every test of the session (the `crds` fixture
applies them with kubectl), so releases here are installed with
`crds.enabled=false` and the chart's CRDs are checked with a server-side dry
run: nothing here takes them over or deletes them. Every release has its own
name, and so its own ClusterRole names: these tests can run beside others.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubetune.api import crd
from kubetune.dev.tools import ensure_tools
from tests.support import finetuning as ft
from tests.support.kube import Kube

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"

# (verb, resource, subresource): what the operator must be able to do ...
ALLOWED = [
    ("list", "pods", None),
    ("watch", "pods", None),
    ("create", "jobs.batch", None),
    ("patch", "jobs.batch", None),
    ("delete", "jobs.batch", None),
    ("watch", "finetuningjobs.kubetune.dev", None),
    ("get", "finetuningjobs.kubetune.dev", None),
    ("patch", "finetuningjobs.kubetune.dev", "status"),
    ("create", "finetuningjobs.kubetune.dev", None),  # a sweep's trials
    ("patch", "finetuningjobs.kubetune.dev", None),  # ... cancelled by the median rule
    ("watch", "finetuningsweeps.kubetune.dev", None),
    ("patch", "finetuningsweeps.kubetune.dev", "status"),
    ("watch", "modelmerges.kubetune.dev", None),
    ("patch", "modelmerges.kubetune.dev", "status"),
    ("create", "registeredmodels.kubetune.dev", None),
    ("get", "registeredmodels.kubetune.dev", None),
    ("watch", "registeredmodels.kubetune.dev", None),
    ("watch", "jobs.batch", None),
    ("create", "services", None),
    ("create", "events", None),
]
# ... and what it must not.
DENIED = [
    ("get", "secrets", None),
    ("list", "secrets", None),
    ("create", "pods", None),
    ("delete", "pods", None),
    ("delete", "services", None),
    ("update", "finetuningjobs.kubetune.dev", None),
    ("delete", "finetuningjobs.kubetune.dev", None),
    ("patch", "finetuningsweeps.kubetune.dev", None),
    ("delete", "finetuningsweeps.kubetune.dev", None),
    ("patch", "modelmerges.kubetune.dev", None),
    ("delete", "modelmerges.kubetune.dev", None),
    ("delete", "registeredmodels.kubetune.dev", None),
    ("patch", "registeredmodels.kubetune.dev", None),
    # No per-job objects any more: no ConfigMaps, identities or RBAC to create.
    ("create", "configmaps", None),
    ("get", "configmaps", None),
    ("create", "serviceaccounts", None),
    ("create", "serviceaccounts", "token"),
    ("create", "roles.rbac.authorization.k8s.io", None),
    ("create", "rolebindings.rbac.authorization.k8s.io", None),
    ("bind", "roles.rbac.authorization.k8s.io", None),
    ("escalate", "roles.rbac.authorization.k8s.io", None),
]
CLUSTER_ALLOWED = [
    ("create", "tokenreviews.authentication.k8s.io", None),  # who sent a report
]
CLUSTER_DENIED = [
    ("delete", "namespaces", None),
    ("create", "clusterroles.rbac.authorization.k8s.io", None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", None),
]


class Cli:
    """helm and kubectl against the test cluster."""

    def __init__(self, kubeconfig: Path) -> None:
        tools = ensure_tools()
        self.helm_bin = str(tools.helm)
        self.kubectl_bin = str(tools.kubectl)
        self.kubeconfig = str(kubeconfig)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([self.helm_bin, "--kubeconfig", self.kubeconfig, *args], check)

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._run([self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args], check, stdin)

    @staticmethod
    def _run(
        command: list[str], check: bool, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            command, input=stdin, capture_output=True, text=True, check=False, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command[:4])} ... failed:\n{result.stderr}")
        return result

    def can_i(
        self, account: str, namespace: str | None, checks: list[tuple[str, str, str | None]]
    ) -> dict[tuple[str, str, str | None], bool]:
        def one(check: tuple[str, str, str | None]) -> bool:
            verb, resource, subresource = check
            args = ["auth", "can-i", verb, resource, f"--as={account}"]
            args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
            if subresource:
                args.append(f"--subresource={subresource}")
            result = self.kubectl(*args, check=False)
            assert result.returncode in (0, 1), result.stderr
            return result.returncode == 0

        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(zip(checks, pool.map(one, checks), strict=True))


@pytest.fixture(scope="module")
def cli(kube: Kube) -> Cli:
    return Cli(kube.kubeconfig)


def _env(kube: Kube, namespace: str, name: str) -> dict[str, str]:
    deployment = kube.apps.read_namespaced_deployment(name, namespace)
    [container] = deployment.spec.template.spec.containers
    return {e.name: e.value for e in container.env if e.value is not None}


def _exists(read, *args: str) -> bool:
    try:
        read(*args)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def test_install_upgrade_uninstall(
    kube: Kube, cli: Cli, crds: None, restricted_namespace: str
) -> None:
    namespace = restricted_namespace
    release = f"kt-{uuid.uuid4().hex[:8]}"
    fullname = f"{release}-kubetune"
    account = f"system:serviceaccount:{namespace}:{fullname}"
    common = ["--namespace", namespace, "--wait", "--timeout", "90s"]
    # The pod passes the namespace's restricted Pod Security admission and is
    # "run" by a simulated node; the image is never pulled.
    # The admission policies are cluster-wide: bound to this namespace only here.
    selector = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    cli.helm(
        "install", release, str(CHART), *common, "--set", "crds.enabled=false",
        "--set-json", f"admission.namespaceSelector={json.dumps(selector)}",
    )  # fmt: skip
    try:
        _check_admission(kube, namespace)
        env = _env(kube, namespace, fullname)
        assert env["KUBETUNE_WORKERS"] == "8"
        assert "KUBETUNE_NAMESPACES" not in env  # all namespaces
        assert _exists(kube.rbac.read_cluster_role, fullname)
        status = cli.helm("status", release, "--namespace", namespace).stdout
        assert "STATUS: deployed" in status

        # Cluster-wide: what it needs, in any namespace; nothing more.
        for where in (namespace, "default"):
            allowed = cli.can_i(account, where, ALLOWED + DENIED)
            assert [c for c in ALLOWED if not allowed[c]] == [], where
            assert [c for c in DENIED if allowed[c]] == [], where
        cluster = cli.can_i(account, None, CLUSTER_DENIED + CLUSTER_ALLOWED)
        assert [c for c in CLUSTER_DENIED if cluster[c]] == []
        assert [c for c in CLUSTER_ALLOWED if not cluster[c]] == []
        # The report endpoint's certificate, made once and kept by an upgrade.
        secret = kube.core.read_namespaced_secret(f"{fullname}-reports-tls", namespace)
        assert set(secret.data) == {"tls.crt", "tls.key", "ca.crt"}

        # Upgrade: watch only this namespace, other settings.
        cli.helm(
            "upgrade", release, str(CHART), *common, "--reuse-values",
            "--set", "operator.workers=3", "--set", f"watchNamespaces={{{namespace}}}",
        )  # fmt: skip
        env = _env(kube, namespace, fullname)
        kept = kube.core.read_namespaced_secret(f"{fullname}-reports-tls", namespace)
        assert kept.data == secret.data
        assert env["KUBETUNE_REPORT_URL"] == f"https://{fullname}-reports.{namespace}.svc:8443"
        assert env["KUBETUNE_WORKERS"] == "3"
        assert env["KUBETUNE_NAMESPACES"] == namespace
        assert not _exists(kube.rbac.read_cluster_role, fullname)
        assert _exists(kube.rbac.read_namespaced_role, fullname, namespace)
        assert _exists(kube.rbac.read_cluster_role, f"{fullname}-kopf")
        allowed = cli.can_i(account, namespace, ALLOWED + DENIED)
        assert [c for c in ALLOWED if not allowed[c]] == []
        assert [c for c in DENIED if allowed[c]] == []
        elsewhere = cli.can_i(account, "default", ALLOWED)
        assert [c for c in ALLOWED if elsewhere[c]] == []
        assert cli.can_i(account, None, [("list", "namespaces", None)]) == {
            ("list", "namespaces", None): True
        }
    finally:
        cli.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s")
    assert not _exists(kube.rbac.read_cluster_role, f"{fullname}-kopf")
    assert not _exists(kube.rbac.read_cluster_role_binding, f"{fullname}-kopf")
    assert not _exists(kube.core.read_namespaced_service_account, fullname, namespace)
    assert not _exists(
        kube.admissionregistration.read_validating_admission_policy_binding,
        f"{fullname}-trainer-images",
    )
    # The CRDs were not the release's: still there.
    assert cli.kubectl("get", "crd", "finetuningjobs.kubetune.dev").returncode == 0


def _check_admission(kube: Kube, namespace: str) -> None:
    """The installed policies refuse an image off the allow-list and let the default
    trainer image's repository through."""

    def dry_run(image: str) -> None:
        body = ft.manifest("admission-check", image=image)
        kube.custom.create_namespaced_custom_object(
            ft.GROUP, ft.VERSION, namespace, ft.PLURAL, body, dry_run="All"
        )

    deadline = time.monotonic() + 30
    while True:  # policies reach admission through the API server's informers
        try:
            dry_run("docker.io/someone/miner:latest")
        except ApiException as err:
            # 422 "no params found": the binding reached admission before its
            # parameters (the allow-list) did; they follow.
            if not (err.status == 422 and "no params found" in err.body):
                assert err.status == 403, err.body
                assert "spec.image: docker.io/someone/miner:latest" in err.body
                break
        assert time.monotonic() < deadline, "the chart's image policy was never enforced"
        time.sleep(0.2)
    dry_run("ghcr.io/kubetune/trainer:0.1.0")


def test_chart_crds_apply_over_the_installed_ones(cli: Cli, crds: None) -> None:
    """What `helm upgrade` would apply to the CRDs: accepted, and the generated schema."""
    rendered = cli.helm(
        "template", "crd-check", str(CHART), "--show-only", "templates/crds.yaml"
    ).stdout
    applied = cli.kubectl(
        "apply", "--server-side", "--dry-run=server", "--field-manager=helm",
        "--output=yaml", "-f", "-",
        stdin=rendered,
    ).stdout  # fmt: skip
    documents = yaml.safe_load(applied)
    items = documents["items"] if documents.get("kind") == "List" else [documents]
    by_name = {item["metadata"]["name"]: item for item in items}
    for name, text in crd.rendered().items():
        expected = yaml.safe_load(text)
        got = by_name[name.removesuffix(".yaml")]
        assert got["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert got["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert got["spec"]["versions"][0]["schema"] == expected["spec"]["versions"][0]["schema"]
        assert got["spec"]["names"] == expected["spec"]["names"]
