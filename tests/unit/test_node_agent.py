"""The development node agent: its pure parts, volume files written from a fake API,
and read-only mounts on this machine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.dev.node_agent import node_manifest, remap
from kubetune.dev.pod_volumes import (
    VolumeResolver,
    bind_plan,
    executable,
    field_value,
    mount_namespace,
    rewrite,
)

MOUNTS = {
    "/tmp": Path("/tmp/pods/p1/volumes/tmp"),
    "/etc/kubetune": Path("/tmp/pods/p1/volumes/config"),
    "/mnt/volumes/models": Path("/data/models"),
}


def test_paths_under_mounts_are_rewritten_once() -> None:
    assert (
        remap("--config /etc/kubetune/config.json", MOUNTS)
        == "--config /tmp/pods/p1/volumes/config/config.json"
    )
    assert remap('{"cache": "/tmp", "out": "/mnt/volumes/models/out"}', MOUNTS) == (
        '{"cache": "/tmp/pods/p1/volumes/tmp", "out": "/data/models/out"}'
    )


def test_only_whole_path_segments_match() -> None:
    assert (
        remap("/tmpfoo /var/tmp /mnt/volumes/models-2", MOUNTS)
        == "/tmpfoo /var/tmp /mnt/volumes/models-2"
    )


def test_node_is_not_kwoks_and_may_offer_fake_gpus() -> None:
    node = node_manifest("local-0", cpu=2, memory="8Gi", gpus=1)
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert (
        "nvidia.com/gpu"
        not in node_manifest("local-0", cpu=2, memory="8Gi", gpus=0)["status"]["capacity"]
    )


# --- volumes -------------------------------------------------------------------------


def _pod(**spec: object) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name="trainer-0",
            namespace="team-a",
            uid="0b9c2a57-5f86-4c1e-9d5e-3f3f1c6f8a10",
            labels={"app": "trainer", "kubetune.dev/job": "demo"},
            annotations={"kubetune.dev/trainer-config": '{"output": "/output/run"}'},
        ),
        spec=client.V1PodSpec(containers=[client.V1Container(name="trainer")], **spec),
    )


class FakeCore:
    """The CoreV1Api calls volume resolution makes, answered from memory."""

    def __init__(self, config_maps: dict[str, dict[str, str]] | None = None) -> None:
        self.config_maps = config_maps or {}
        self.token_requests: list[client.AuthenticationV1TokenRequest] = []

    def read_namespaced_config_map(self, name: str, namespace: str) -> client.V1ConfigMap:
        if name not in self.config_maps:
            raise ApiException(status=404)
        return client.V1ConfigMap(data=self.config_maps[name])

    def create_namespaced_service_account_token(
        self, name: str, namespace: str, body: client.AuthenticationV1TokenRequest
    ) -> client.AuthenticationV1TokenRequest:
        self.token_requests.append(body)
        audience = ",".join(body.spec.audiences) or "api"
        return client.AuthenticationV1TokenRequest(
            spec=body.spec,
            status=client.V1TokenRequestStatus(
                token=f"token-for-{name}-{audience}", expiration_timestamp=None
            ),
        )


def test_labels_and_annotations_are_written_as_a_kubelet_writes_them() -> None:
    pod = _pod()
    assert field_value(pod, "metadata.labels") == 'app="trainer"\nkubetune.dev/job="demo"'
    assert field_value(pod, "metadata.annotations") == (
        'kubetune.dev/trainer-config="{\\"output\\": \\"/output/run\\"}"'
    )
    assert field_value(pod, "metadata.annotations['kubetune.dev/trainer-config']") == (
        '{"output": "/output/run"}'
    )
    assert field_value(pod, "metadata.labels['missing']") == ""
    assert field_value(pod, "metadata.namespace") == "team-a"
    with pytest.raises(ValueError, match=r"spec\.nodeName"):
        field_value(pod, "spec.nodeName")


def test_downward_api_volume_files_have_their_modes_and_may_name_container_paths(
    tmp_path: Path,
) -> None:
    item = client.V1DownwardAPIVolumeFile
    pod = _pod(
        volumes=[
            client.V1Volume(
                name="config",
                downward_api=client.V1DownwardAPIVolumeSource(
                    items=[
                        item(
                            path="config.json",
                            field_ref=client.V1ObjectFieldSelector(
                                field_path="metadata.annotations['kubetune.dev/trainer-config']"
                            ),
                            mode=0o400,
                        ),
                        item(
                            path="meta/labels",
                            field_ref=client.V1ObjectFieldSelector(field_path="metadata.labels"),
                        ),
                    ]
                ),
            )
        ]
    )
    volumes = VolumeResolver(FakeCore(), ca_file=None).resolve(pod, tmp_path)
    folder = volumes.folders["config"]
    assert (folder / "config.json").read_text() == '{"output": "/output/run"}'
    assert (folder / "config.json").stat().st_mode & 0o777 == 0o400
    assert (folder / "meta" / "labels").stat().st_mode & 0o777 == 0o644
    assert set(volumes.remappable) == {folder / "config.json", folder / "meta" / "labels"}
    assert "config" in volumes.read_only


def test_only_an_audience_less_projected_token_is_the_process_credential(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "agent-ca.crt"
    ca.write_text("AGENT CA")
    projection = client.V1VolumeProjection
    pod = _pod(
        service_account_name="trainer",
        volumes=[
            client.V1Volume(
                name="operator-token",
                projected=client.V1ProjectedVolumeSource(
                    sources=[
                        projection(
                            service_account_token=client.V1ServiceAccountTokenProjection(
                                audience="kubetune-operator", expiration_seconds=600, path="token"
                            )
                        ),
                        projection(
                            config_map=client.V1ConfigMapProjection(
                                name="settings",
                                items=[client.V1KeyToPath(key="url", path="settings/url")],
                            )
                        ),
                    ]
                ),
            ),
            client.V1Volume(
                name="kube-api-access-x7k2p",
                projected=client.V1ProjectedVolumeSource(
                    default_mode=0o644,
                    sources=[
                        projection(
                            service_account_token=client.V1ServiceAccountTokenProjection(
                                expiration_seconds=3607, path="token"
                            )
                        ),
                        projection(
                            config_map=client.V1ConfigMapProjection(
                                name="kube-root-ca.crt",
                                items=[client.V1KeyToPath(key="ca.crt", path="ca.crt")],
                            )
                        ),
                        projection(
                            downward_api=client.V1DownwardAPIProjection(
                                items=[
                                    client.V1DownwardAPIVolumeFile(
                                        path="namespace",
                                        field_ref=client.V1ObjectFieldSelector(
                                            field_path="metadata.namespace"
                                        ),
                                    )
                                ]
                            )
                        ),
                    ],
                ),
            ),
        ],
    )
    core = FakeCore({"settings": {"url": "http://operator:8080"}})
    volumes = VolumeResolver(core, ca_file=str(ca)).resolve(pod, tmp_path)

    custom, api = volumes.folders["operator-token"], volumes.folders["kube-api-access-x7k2p"]
    assert (custom / "token").read_text() == "token-for-trainer-kubetune-operator"
    assert (custom / "settings" / "url").read_text() == "http://operator:8080"
    assert (api / "token").read_text() == "token-for-trainer-api"
    assert (
        api / "ca.crt"
    ).read_text() == "AGENT CA"  # what the process needs to reach the agent's server
    assert (api / "namespace").read_text() == "team-a"
    assert [(a.volume, a.token, a.ca) for a in volumes.api_access] == [
        ("kube-api-access-x7k2p", api / "token", api / "ca.crt")
    ]
    custom_request, api_request = core.token_requests
    assert custom_request.spec.audiences == ["kubetune-operator"]
    assert custom_request.spec.expiration_seconds == 600
    assert api_request.spec.audiences == []
    assert api_request.spec.bound_object_ref.uid == pod.metadata.uid
    assert {"operator-token", "kube-api-access-x7k2p"} <= volumes.read_only


def test_read_only_folders_are_bound_parents_first_and_writable_ones_inside_stay_writable(
    tmp_path: Path,
) -> None:
    data, output, config = tmp_path / "data", tmp_path / "data" / "output", tmp_path / "config"
    pod_dir = tmp_path / "data" / "pods" / "p1"
    plan = bind_plan([(config, True), (output, False), (data, True)], [pod_dir])
    assert plan == [(config, True), (data, True), (output, False), (pod_dir, False)]
    # Writable folders not beneath a read-only one need no mount at all.
    assert bind_plan([(output, False)], [pod_dir]) == []
    # One folder mounted both ways in one pod: both mounts see the same folder.
    assert bind_plan([(data, True), (data, False)]) == []


def test_a_wrapped_process_keeps_its_pid_and_cannot_write_below_a_read_only_folder(
    tmp_path: Path,
) -> None:
    namespace = mount_namespace()
    if namespace is None:
        pytest.skip("this machine cannot bind-mount in a private mount namespace")
    shared, scratch = tmp_path / "shared", tmp_path / "shared" / "scratch"
    scratch.mkdir(parents=True)
    script = 'echo $$; touch "$1/denied" 2>&1; touch "$2/allowed"'
    argv = ["/bin/sh", "-c", script, "pod", str(shared), str(scratch)]
    plan = bind_plan([(shared, True), (scratch, False)])
    process = subprocess.Popen(
        namespace.wrap(argv, plan), stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    out, _ = process.communicate(timeout=30)
    pid, message = out.splitlines()[:2]
    assert int(pid) == process.pid
    assert "Read-only file system" in message
    assert (scratch / "allowed").exists() and not (shared / "denied").exists()
    # Only that process's namespace is affected.
    (shared / "outside").write_text("still writable")


def test_a_missing_command_fails_the_start() -> None:
    with pytest.raises(FileNotFoundError, match='exec: "no-such-command"'):
        executable("no-such-command", os.environ.get("PATH"))
    assert executable("sh", os.environ.get("PATH")).endswith("/sh")


def test_rewriting_keeps_a_files_mode_and_leaves_binary_files_alone(tmp_path: Path) -> None:
    text, binary = tmp_path / "config.json", tmp_path / "weights.bin"
    text.write_text('{"out": "/output"}')
    binary.write_bytes(b"\xff\xfe/output")
    for path in (text, binary):
        path.chmod(0o400)
        rewrite(path, lambda value: remap(value, {"/output": Path("/local/out")}))
    assert text.read_text() == '{"out": "/local/out"}'
    assert text.stat().st_mode & 0o777 == 0o400
    assert binary.read_bytes() == b"\xff\xfe/output"
