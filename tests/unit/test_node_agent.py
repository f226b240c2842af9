"""Pure parts of the development node agent."""

from __future__ import annotations

from pathlib import Path

from kubetune.dev.node_agent import node_manifest, remap

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
