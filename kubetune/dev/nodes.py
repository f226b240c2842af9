"""The simulated node fleet of the local cluster: GPU nodes and a CPU node.

GPU nodes look like those the NVIDIA GPU Operator's feature discovery
labels on a real cluster, with the taint that cloud providers put on GPU
node pools, so that pods must both request `nvidia.com/gpu` and tolerate the
taint to land there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

# Marks nodes that KWOK simulates (a real node agent may join the cluster too).
SIMULATED_ANNOTATION = "kwok.x-k8s.io/node"
SIMULATED_VALUE = "fake"

NODE_ROLE_LABEL = "kubetune.dev/node-pool"


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node: its name, pool and capacity."""

    name: str
    pool: str
    cpu: str = "32"
    memory: str = "256Gi"
    gpus: int = 0
    gpu_product: str = ""
    gpu_memory_mib: int = 0
    instance_type: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"{self.name}: gpus must be >= 0")
        if self.gpus and not self.gpu_product:
            raise ValueError(f"{self.name}: a GPU node needs gpu_product")


A100_NODES = 4  # enough for a 4-node x 8-GPU job


def default_fleet() -> list[NodeSpec]:
    """Two kinds of GPU node (four 8-GPU A100 nodes for multi-node jobs) and one CPU node."""
    a100 = [
        NodeSpec(
            name=f"gpu-a100-{index}",
            pool="gpu-a100",
            cpu="96",
            memory="1152Gi",
            gpus=8,
            gpu_product="NVIDIA-A100-SXM4-80GB",
            gpu_memory_mib=81920,
            instance_type="a2-ultragpu-8g",
        )
        for index in range(A100_NODES)
    ]
    return [
        *a100,
        NodeSpec(
            name="gpu-l4-0",
            pool="gpu-l4",
            cpu="16",
            memory="64Gi",
            gpus=1,
            gpu_product="NVIDIA-L4",
            gpu_memory_mib=23034,
            instance_type="g2-standard-16",
        ),
        NodeSpec(name="cpu-0", pool="cpu", cpu="16", memory="64Gi", instance_type="n2-standard-16"),
    ]


def node_manifest(spec: NodeSpec) -> dict[str, Any]:
    """The Node object for one simulated node."""
    capacity = {"cpu": spec.cpu, "memory": spec.memory, "pods": "110", "ephemeral-storage": "500Gi"}
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        NODE_ROLE_LABEL: spec.pool,
    }
    if spec.instance_type:
        labels["node.kubernetes.io/instance-type"] = spec.instance_type
    taints: list[dict[str, str]] = []
    if spec.gpus:
        capacity[GPU_RESOURCE] = str(spec.gpus)
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": spec.gpu_product,
            "nvidia.com/gpu.count": str(spec.gpus),
            "nvidia.com/gpu.memory": str(spec.gpu_memory_mib),
        }
        taints.append(dict(GPU_TAINT))
    labels |= spec.labels
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "labels": labels,
            "annotations": {
                SIMULATED_ANNOTATION: SIMULATED_VALUE,
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {"taints": taints} if taints else {},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }
