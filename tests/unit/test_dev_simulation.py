"""The simulated fleet and KWOK stages that the local cluster is started with."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.dev import nodes, simulation
from kubetune.dev.cluster import kwokctl_config_documents
from kubetune.dev.tools import Tools, pinned_versions


def test_gpu_node_has_capacity_labels_and_taint() -> None:
    spec = nodes.NodeSpec(
        name="g", pool="gpu", gpus=4, gpu_product="NVIDIA-H100-80GB-HBM3", gpu_memory_mib=81559
    )

    node = nodes.node_manifest(spec)

    assert node["status"]["capacity"]["nvidia.com/gpu"] == "4"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.count"] == "4"
    assert labels["nvidia.com/gpu.memory"] == "81559"
    assert node["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    assert node["metadata"]["annotations"][nodes.SIMULATED_ANNOTATION] == nodes.SIMULATED_VALUE


def test_cpu_node_has_no_gpu_and_no_taint() -> None:
    node = nodes.node_manifest(nodes.NodeSpec(name="c", pool="cpu"))

    assert "nvidia.com/gpu" not in node["status"]["capacity"]
    assert "taints" not in node["spec"]
    assert not any(key.startswith("nvidia.com/") for key in node["metadata"]["labels"])


def test_default_fleet_has_gpu_and_cpu_nodes() -> None:
    fleet = nodes.default_fleet()
    assert any(spec.gpus for spec in fleet)
    assert any(not spec.gpus for spec in fleet)
    assert len({spec.name for spec in fleet}) == len(fleet)


def test_gpu_node_needs_a_product() -> None:
    with pytest.raises(ValueError, match="gpu_product"):
        nodes.NodeSpec(name="g", pool="gpu", gpus=1)


def test_pod_annotations_steer_outcomes() -> None:
    assert simulation.pod_annotations("fail", exit_code=3, message="bad row", duration="2s") == {
        simulation.OUTCOME: "fail",
        simulation.EXIT_CODE: "3",
        simulation.MESSAGE: "bad row",
        simulation.DURATION: "2s",
    }


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"outcome": "explode"}, "outcome must be one of"),
        ({"outcome": "succeed", "exit_code": 2}, "only applies"),
        ({"outcome": "fail", "exit_code": 0}, "between 1 and 255"),
        ({"outcome": "fail", "exit_code": 256}, "between 1 and 255"),
    ],
)
def test_pod_annotations_refuse_nonsense(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        simulation.pod_annotations(**kwargs)


def test_node_stages_keep_nodes_ready() -> None:
    names = [stage["metadata"]["name"] for stage in simulation.node_stages()]
    assert names == ["node-initialize", "node-heartbeat"]
    heartbeat = simulation.node_stages()[1]["spec"]
    # Must beat kube-controller-manager's 40s node-monitor grace period.
    assert heartbeat["delay"]["durationMilliseconds"] < 40_000


def test_every_outcome_has_a_stage_except_run() -> None:
    stages = simulation.pod_stages()
    steered = set()
    for stage in stages:
        for expression in stage["spec"].get("selector", {}).get("matchExpressions", []):
            if expression["key"] == f'.metadata.annotations["{simulation.OUTCOME}"]':
                steered.update(expression.get("values", ["<unset>"]))
    assert steered == {"<unset>", "succeed", "fail", "oom", "image-pull", "fail-rank"}


def test_stage_status_templates_are_valid_yaml_shapes() -> None:
    # Templates are Go templates; their static skeleton must still be YAML
    # once the template actions are blanked out.
    for stage in simulation.node_stages() + simulation.pod_stages():
        template = stage["spec"].get("next", {}).get("statusTemplate")
        if template:
            skeleton = "\n".join(
                line for line in template.splitlines() if not line.strip().startswith("{{")
            )
            assert yaml.safe_load(skeleton.replace("{{", "'{{").replace("}}", "}}'")) is not None


def test_kwokctl_config_binds_loopback_and_uses_local_binaries(tmp_path: Path) -> None:
    for name in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "kwok",
        "etcd",
    ]:
        (tmp_path / name).write_text("")
    documents = kwokctl_config_documents(Tools(tmp_path), "v1.36.3")

    options = documents[0]["options"]
    assert documents[0]["kind"] == "KwokctlConfiguration"
    assert options["bindAddress"] == "127.0.0.1"
    assert options["runtime"] == "binary"
    assert options["kubeApiserverBinary"] == str(tmp_path / "kube-apiserver")
    assert all(not str(v).startswith("http") for v in options.values())
    kinds = [doc["kind"] for doc in documents[1:]]
    assert set(kinds) == {"Stage"}
    # Custom stages replace KWOK's defaults: node initialisation must be among them.
    assert "node-initialize" in [doc["metadata"]["name"] for doc in documents[1:]]


def test_pinned_versions_are_exact() -> None:
    versions = pinned_versions()
    for key in ["KUBERNETES_VERSION", "ETCD_VERSION", "KWOK_VERSION", "HELM_VERSION"]:
        assert versions[key].startswith("v")
        assert versions[key].count(".") == 2


def test_stdlib_operator_module_is_not_shadowed() -> None:
    import operator

    assert operator.__file__ is not None
    assert "site-packages" not in operator.__file__
    assert Path(operator.__file__).parent.name.startswith("python3")


def test_fail_rank_needs_an_index() -> None:
    annotations = simulation.pod_annotations("fail-rank", fail_index=2, fail_message="boom")
    assert annotations[simulation.FAIL_INDEX] == "2"
    assert annotations[simulation.FAIL_RESTART] == "0"
    assert annotations[simulation.FAIL_MESSAGE] == "boom"
    with pytest.raises(ValueError, match="fail_index"):
        simulation.pod_annotations("fail-rank")
    with pytest.raises(ValueError, match="fail_index"):
        simulation.pod_annotations("fail", fail_index=1)
