"""The Helm chart: lint, render with several value sets, check every object it makes.

Needs the pinned helm binary (hack/build-tools.sh), no cluster.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_operator.main import settings_from_env
from kubetune_operator.settings import OperatorSettings

from kubetune.api import admission, crd
from kubetune.api.finetuningjob import FineTuningJobSpec
from kubetune.dev.tools import ensure_tools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
RELEASE = "rel"
NAMESPACE = "kubetune-system"
FULLNAME = f"{RELEASE}-kubetune"

Obj = dict[str, Any]

# What the operator does with the API (kubetune_operator.reconcile, .handlers), exactly.
OPERATOR_RULES = [
    {
        "apiGroups": ["kubetune.dev"],
        "resources": ["finetuningjobs"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
    {"apiGroups": ["kubetune.dev"], "resources": ["finetuningjobs/status"], "verbs": ["patch"]},
    {
        "apiGroups": ["kubetune.dev"],
        "resources": ["finetuningsweeps"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": ["kubetune.dev"], "resources": ["finetuningsweeps/status"], "verbs": ["patch"]},
    {
        "apiGroups": ["kubetune.dev"],
        "resources": ["modelmerges"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": ["kubetune.dev"], "resources": ["modelmerges/status"], "verbs": ["patch"]},
    {
        "apiGroups": ["kubetune.dev"],
        "resources": ["registeredmodels"],
        "verbs": ["get", "list", "watch", "create"],
    },
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    {
        "apiGroups": ["kueue.x-k8s.io"],
        "resources": ["workloads"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
TOKEN_REVIEWS = {
    "apiGroups": ["authentication.k8s.io"],
    "resources": ["tokenreviews"],
    "verbs": ["create"],
}
CRD_DISCOVERY = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
NAMESPACE_DISCOVERY = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
LEASE_RULES = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": [FULLNAME],
        "verbs": ["get", "update"],
    },
]

VALUE_SETS: dict[str, Obj] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "ha": {"replicaCount": 2},
    "namespaced-ha": {"watchNamespaces": ["team-a"], "replicaCount": 3},
    "no-leader-election": {"leaderElection": {"enabled": False}},
    "everything": {
        "metrics": {"serviceMonitor": {"enabled": True}},
        "networkPolicy": {"enabled": True},
        "podDisruptionBudget": {"enabled": True},
    },
    "no-crds": {"crds": {"enabled": False}},
}


@pytest.fixture(scope="module")
def helm_bin() -> str:
    return str(ensure_tools().helm)


def _run(helm_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_bin, *args], capture_output=True, text=True, check=False, timeout=60
    )


def _values_file(tmp: Path, values: Obj) -> Path:
    path = tmp / f"values-{len(list(tmp.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def render(helm_bin: str, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("values")
    cache: dict[str, list[Obj]] = {}

    def _render(values: Obj | None = None) -> list[Obj]:
        key = yaml.safe_dump(values or {})
        if key not in cache:
            result = _run(
                helm_bin,
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                NAMESPACE,
                "--values",
                str(_values_file(tmp, values or {})),
            )
            assert result.returncode == 0, result.stderr
            cache[key] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[key]

    return _render


def _of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def _one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in _of_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(objects: list[Obj]) -> Obj:
    [container] = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _env(objects: list[Obj]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(objects)["env"]}


# -- lint and schema -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_is_clean_in_strict_mode(helm_bin: str, tmp_path: Path, name: str) -> None:
    values = _values_file(tmp_path, VALUE_SETS[name])
    result = _run(helm_bin, "lint", "--strict", str(CHART), "--values", str(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.30.0-0"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"replicaCount": -1}, "/replicaCount"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
        ({"operator": {"workers": 0}}, "/operator/workers"),
        ({"metrics": {"port": 70000}}, "/metrics/port"),
        ({"crds": {"enabled": "yes"}}, "/crds/enabled"),
        ({"podDisruptionBudget": {"maxUnavailable": "a lot"}}, "/podDisruptionBudget"),
        ({"replicaCuont": 1}, "replicaCuont"),
    ],
)
def test_schema_rejects_bad_values(
    helm_bin: str, tmp_path: Path, values: Obj, message: str
) -> None:
    result = _run(
        helm_bin, "template", RELEASE, str(CHART), "--values", str(_values_file(tmp_path, values))
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_several_replicas_need_leader_election(helm_bin: str) -> None:
    result = _run(
        helm_bin,
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "replicaCount=2",
        "--set",
        "leaderElection.enabled=false",
    )
    assert result.returncode != 0
    assert "leaderElection.enabled" in result.stderr


# -- what is rendered ------------------------------------------------------------------------


def test_default_objects(render) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render())
    assert kinds == sorted(
        [
            ("ClusterRole", FULLNAME),
            ("ClusterRole", f"{FULLNAME}-kopf"),
            ("ClusterRole", f"{FULLNAME}-reports"),
            ("ClusterRoleBinding", FULLNAME),
            ("ClusterRoleBinding", f"{FULLNAME}-kopf"),
            ("ClusterRoleBinding", f"{FULLNAME}-reports"),
            ("CustomResourceDefinition", "finetuningjobs.kubetune.dev"),
            ("CustomResourceDefinition", "finetuningsweeps.kubetune.dev"),
            ("CustomResourceDefinition", "modelmerges.kubetune.dev"),
            ("CustomResourceDefinition", "registeredmodels.kubetune.dev"),
            ("Deployment", FULLNAME),
            ("Role", f"{FULLNAME}-leader-election"),
            ("RoleBinding", f"{FULLNAME}-leader-election"),
            ("Service", f"{FULLNAME}-metrics"),
            ("Service", f"{FULLNAME}-reports"),
            ("Secret", f"{FULLNAME}-reports-tls"),
            ("ServiceAccount", FULLNAME),
            ("ValidatingAdmissionPolicy", admission.SECRET_POLICY),
            ("ValidatingAdmissionPolicy", admission.IMAGE_POLICY),
            ("ValidatingAdmissionPolicyBinding", f"{FULLNAME}-secret-references"),
            ("ValidatingAdmissionPolicyBinding", f"{FULLNAME}-trainer-images"),
            ("ConfigMap", f"{FULLNAME}-allowed-images"),
        ]
    )


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_object_carries_the_standard_labels(render, name: str) -> None:
    for obj in render(VALUE_SETS[name]):
        labels = obj["metadata"]["labels"]
        where = f"{obj['kind']} {obj['metadata']['name']}"
        assert labels["helm.sh/chart"] == "kubetune-0.1.0", where
        assert labels["app.kubernetes.io/instance"] == RELEASE, where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["app.kubernetes.io/part-of"] == "kubetune", where
        if obj["kind"] not in ("CustomResourceDefinition",):
            assert labels["app.kubernetes.io/name"] == "kubetune", where
            assert labels["app.kubernetes.io/version"] == "0.1.0", where
        if obj["metadata"].get("namespace") is None:
            continue
        if obj["kind"] not in ("Role", "RoleBinding", "KopfPeering"):
            assert obj["metadata"]["namespace"] == NAMESPACE, where


def test_deployment_is_restricted_and_probed(render) -> None:
    deployment = _one(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    # Leader election (on by default) lets the new pod start before the old one goes.
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container(render())
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081, "reports": 8443}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert container["resources"]["limits"] == {"memory": "512Mi"}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {
        "/tmp",
        "/etc/kubetune/reports-tls",
    }
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_image_values(render) -> None:
    container = _container(
        render({"image": {"repository": "example.org/op", "tag": "dev", "pullPolicy": "Always"}})
    )
    assert container["image"] == "example.org/op:dev"
    assert container["imagePullPolicy"] == "Always"


def test_environment_maps_to_the_operator_settings(render, monkeypatch) -> None:
    objects = render(
        {
            "watchNamespaces": ["team-a", "team-b"],
            "operator": {
                "trainerImage": "example.org/trainer:1",
                "workers": 3,
                "finishedJobTTLSeconds": 600,
                "imagePullTimeoutSeconds": 42,
            },
            "replicaCount": 2,
        }
    )
    env = _env(objects)
    fields = set(OperatorSettings.model_fields)
    for name in env:
        if name.startswith("KUBETUNE_"):
            assert name.removeprefix("KUBETUNE_").lower() in fields, name
    assert env["KUBETUNE_LEADER_ELECTION_NAMESPACE"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    for name, value in env.items():
        if name.startswith("KUBETUNE_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBETUNE_LEADER_ELECTION_NAMESPACE", NAMESPACE)
    settings = settings_from_env()
    assert settings.namespaces == ["team-a", "team-b"]
    assert settings.trainer_image == "example.org/trainer:1"
    assert settings.workers == 3
    assert settings.finished_job_ttl_seconds == 600
    assert settings.image_pull_timeout_seconds == 42
    assert settings.leader_election is True
    assert settings.leader_election_id == FULLNAME
    assert settings.leader_election_namespace == NAMESPACE
    assert settings.metrics_port == 8080
    assert settings.health_port == 8081
    assert settings.kubeconfig is None


def test_default_settings_match_the_operator_defaults(render, monkeypatch) -> None:
    for name, value in _env(render()).items():
        if name.startswith("KUBETUNE_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    rendered = settings_from_env()
    defaults = OperatorSettings()
    assert rendered.namespaces == []
    assert "KUBETUNE_NAMESPACES" not in _env(render())
    assert rendered.leader_election is True  # the chart's default; a local run's is off
    elected = ("leader_election", "leader_election_id", "leader_election_namespace")
    # Where the chart's Service and certificate are: known only to the chart.
    reporting = ("report_url", "report_tls_cert", "report_tls_key", "report_ca")
    assert rendered.report_url == f"https://{FULLNAME}-reports.{NAMESPACE}.svc:8443"
    for field in OperatorSettings.model_fields:
        if field not in ("namespaces", "kubeconfig", *elected, *reporting):
            assert getattr(rendered, field) == getattr(defaults, field), field


# -- RBAC ------------------------------------------------------------------------------------


def test_clusterwide_rbac_is_exactly_what_the_operator_uses(render) -> None:
    objects = render()
    assert _one(objects, "ClusterRole", FULLNAME)["rules"] == OPERATOR_RULES
    assert _one(objects, "ClusterRole", f"{FULLNAME}-kopf")["rules"] == [CRD_DISCOVERY]
    assert _one(objects, "ClusterRole", f"{FULLNAME}-reports")["rules"] == [TOKEN_REVIEWS]
    for name in (FULLNAME, f"{FULLNAME}-kopf", f"{FULLNAME}-reports"):
        binding = _one(objects, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
    # Namespaced rights only for the leader-election Lease.
    assert [r["metadata"]["name"] for r in _of_kind(objects, "Role")] == [
        f"{FULLNAME}-leader-election"
    ]
    assert len(_of_kind(objects, "RoleBinding")) == 1


def _workload_rbac(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in _of_kind(objects, kind) if not o["metadata"]["name"].endswith("-election")]


def test_watched_namespaces_get_roles_and_no_cluster_role(render) -> None:
    objects = render(VALUE_SETS["namespaced"])
    roles = _workload_rbac(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert role["metadata"]["name"] == FULLNAME
        assert role["rules"] == OPERATOR_RULES
    bindings = _workload_rbac(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
    # Only kopf's cluster-scoped reads and TokenReviews stay cluster-wide.
    cluster_roles = {r["metadata"]["name"]: r["rules"] for r in _of_kind(objects, "ClusterRole")}
    assert cluster_roles == {
        f"{FULLNAME}-kopf": [CRD_DISCOVERY, NAMESPACE_DISCOVERY],
        f"{FULLNAME}-reports": [TOKEN_REVIEWS],
    }
    assert _env(objects)["KUBETUNE_NAMESPACES"] == "team-a,team-b"


def test_rbac_can_be_left_out(render) -> None:
    objects = render({"rbac": {"create": False}, "serviceAccount": {"create": False}})
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"):
        assert not _of_kind(objects, kind)
    assert _one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == (
        "default"
    )


FORBIDDEN = [
    ("", "secrets", None),
    ("", "namespaces", {"create", "delete", "patch", "update", "get"}),
    ("", "pods", {"create", "delete", "patch", "update"}),
    # Created (and cancelled) as a sweep's trials; never replaced or deleted.
    ("kubetune.dev", "finetuningjobs", {"delete", "update"}),
    ("kubetune.dev", "finetuningsweeps", {"create", "delete", "patch", "update"}),
    ("kubetune.dev", "modelmerges", {"create", "delete", "patch", "update"}),
    ("kueue.x-k8s.io", "workloads", {"create", "delete", "update"}),
    ("kubetune.dev", "registeredmodels", {"delete", "patch", "update"}),
    ("rbac.authorization.k8s.io", "clusterroles", None),
    ("rbac.authorization.k8s.io", "clusterrolebindings", None),
    ("rbac.authorization.k8s.io", "roles", {"bind", "escalate", "patch", "update", "delete"}),
]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rbac_never_grants_more(render, name: str) -> None:
    for obj in render(VALUE_SETS[name]):
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in obj["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert "*" not in rule["apiGroups"], rule
            if "resourceNames" in rule:  # narrower, never wider: only the one Lease
                assert rule["resources"] == ["leases"], rule
            for group, resource, verbs in FORBIDDEN:
                if group in rule["apiGroups"] and resource in rule["resources"]:
                    assert verbs is not None, f"{obj['metadata']['name']} grants {resource}"
                    assert not verbs & set(rule["verbs"]), rule


# -- optional objects ------------------------------------------------------------------------


def test_metrics_service(render) -> None:
    service = _one(render(), "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert (
        service["spec"]["selector"]
        == _one(render(), "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_service_monitor_only_when_enabled(render) -> None:
    assert not _of_kind(render(), "ServiceMonitor")
    monitor = _one(render(VALUE_SETS["everything"]), "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE


def test_network_policy(render) -> None:
    assert not _of_kind(render(), "NetworkPolicy")
    policy = _one(render(VALUE_SETS["everything"]), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ingress, reports = spec["ingress"]
    assert {p["port"] for p in ingress["ports"]} == {"metrics", "health"}
    # Trainers report from any namespace.
    assert reports == {
        "ports": [{"port": "reports", "protocol": "TCP"}],
        "from": [{"namespaceSelector": {}}],
    }
    egress_ports = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")}
    restricted = render(
        {"networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}}}
    )
    api_rule = _one(restricted, "NetworkPolicy")["spec"]["egress"][1]
    assert api_rule["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]


def test_pod_disruption_budget(render) -> None:
    assert not _of_kind(render(), "PodDisruptionBudget")
    budget = _one(render(VALUE_SETS["everything"]), "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in budget["spec"]
    budget = _one(
        render({"podDisruptionBudget": {"enabled": True, "minAvailable": 1}}),
        "PodDisruptionBudget",
    )
    assert budget["spec"] == {
        "selector": budget["spec"]["selector"],
        "minAvailable": 1,
    }


# -- CRDs ------------------------------------------------------------------------------------


def test_crds_are_the_generated_ones(render) -> None:
    rendered = {o["metadata"]["name"]: o for o in _of_kind(render(), "CustomResourceDefinition")}
    generated = {
        name.removesuffix(".yaml"): yaml.safe_load(t) for name, t in crd.rendered().items()
    }
    assert set(rendered) == set(generated)
    for name, expected in generated.items():
        got = rendered[name]
        assert got["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert expected["metadata"]["labels"].items() <= got["metadata"]["labels"].items()
        strip = {"annotations", "labels"}
        assert {k: v for k, v in got["metadata"].items() if k not in strip} == {
            k: v for k, v in expected["metadata"].items() if k not in strip
        }
        assert {k: v for k, v in got.items() if k != "metadata"} == {
            k: v for k, v in expected.items() if k != "metadata"
        }


def test_crds_can_be_left_out_or_not_kept(render) -> None:
    assert not _of_kind(render(VALUE_SETS["no-crds"]), "CustomResourceDefinition")
    for obj in _of_kind(render({"crds": {"keep": False}}), "CustomResourceDefinition"):
        assert "annotations" not in obj["metadata"]


def test_admission_policies_are_the_generated_ones(render) -> None:
    objects = render()
    rendered = {o["metadata"]["name"]: o for o in _of_kind(objects, "ValidatingAdmissionPolicy")}
    for expected in admission.policies():
        got = rendered[expected["metadata"]["name"]]
        assert expected["metadata"]["labels"].items() <= got["metadata"]["labels"].items()
        assert got["spec"] == expected["spec"]
    params = f"{FULLNAME}-allowed-images"
    bindings = _of_kind(objects, "ValidatingAdmissionPolicyBinding")
    expected = admission.bindings(NAMESPACE, params, prefix=FULLNAME)
    assert [(b["metadata"]["name"], b["spec"]) for b in bindings] == [
        (b["metadata"]["name"], b["spec"]) for b in expected
    ]
    allowed = _one(objects, "ConfigMap", params)
    assert allowed["metadata"]["namespace"] == NAMESPACE
    # The default prefix, and the operator's own trainer image always.
    assert allowed["data"][admission.IMAGE_PREFIXES_KEY].split("\n") == [
        "ghcr.io/kubetune/",
        "ghcr.io/kubetune/trainer:0.1.0",
    ]


def test_admission_values(render) -> None:
    objects = render(
        {
            "admission": {
                "allowedImagePrefixes": ["registry.example.com/ml/"],
                "namespaceSelector": {"matchLabels": {"team": "ml"}},
            },
            "operator": {"trainerImage": "registry.example.com/ml/trainer:2"},
        }
    )
    allowed = _one(objects, "ConfigMap", f"{FULLNAME}-allowed-images")
    assert allowed["data"][admission.IMAGE_PREFIXES_KEY].split("\n") == [
        "registry.example.com/ml/",
        "registry.example.com/ml/trainer:2",
    ]
    for binding in _of_kind(objects, "ValidatingAdmissionPolicyBinding"):
        assert binding["spec"]["matchResources"] == {
            "namespaceSelector": {"matchLabels": {"team": "ml"}}
        }
    off = render({"admission": {"enabled": False, "allowedImagePrefixes": []}})
    assert not [o for o in off if o["kind"].startswith("ValidatingAdmissionPolicy")]
    assert not _of_kind(off, "ConfigMap")


# -- leader election -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ha", "namespaced-ha"])
def test_several_replicas_elect_a_leader_on_one_lease(render, name: str) -> None:
    objects = render(VALUE_SETS[name])
    deployment = _one(objects, "Deployment")
    assert deployment["spec"]["replicas"] in (2, 3)
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = _env(objects)
    assert env["KUBETUNE_LEADER_ELECTION"] == "true"
    assert env["KUBETUNE_LEADER_ELECTION_ID"] == FULLNAME
    role = _one(objects, "Role", f"{FULLNAME}-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == LEASE_RULES
    binding = _one(objects, "RoleBinding", f"{FULLNAME}-leader-election")
    assert binding["roleRef"]["name"] == f"{FULLNAME}-leader-election"
    names = {o["metadata"]["name"] for o in _of_kind(objects, "CustomResourceDefinition")}
    assert not any(name.endswith(".kopf.dev") for name in names)


def test_without_leader_election_one_replica_replaces_the_other(render) -> None:
    objects = render(VALUE_SETS["no-leader-election"])
    assert _one(objects, "Deployment")["spec"]["strategy"]["type"] == "Recreate"
    assert "KUBETUNE_LEADER_ELECTION" not in _env(objects)
    assert not [o for o in _of_kind(objects, "Role") if "leader" in o["metadata"]["name"]]


# -- documentation ---------------------------------------------------------------------------


def test_notes_example_is_a_valid_finetuningjob() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    match = re.search(r"<<'YAML'.*?\n(.*?)\n\s*YAML\n", notes, re.S)
    assert match, "NOTES.txt has no example FineTuningJob"
    example = yaml.safe_load(textwrap.dedent(match.group(1)))
    assert example["kind"] == "FineTuningJob"
    FineTuningJobSpec.model_validate(example["spec"])


def test_values_are_documented_in_the_readme() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in values:
        assert f"`{key}" in readme, f"values key {key} is not in charts/kubetune/README.md"
