"""Statically provisioned volumes for the development cluster.

The local cluster has no storage provisioner: a hostPath PersistentVolume
bound to its claim up front stands in. Simulated nodes never mount it; the
node agent runs pods against the host folder itself.
"""

from __future__ import annotations

from pathlib import Path

from kubernetes import client
from kubernetes.client.exceptions import ApiException


def bound_claim(
    core: client.CoreV1Api, namespace: str, claim: str, host_path: Path | str, size: str = "10Gi"
) -> None:
    """A PersistentVolumeClaim bound to a hostPath PersistentVolume; existing ones are kept."""
    volume_name = f"{namespace}-{claim}"[:253]
    objects = [
        (
            core.create_persistent_volume,
            (
                client.V1PersistentVolume(
                    metadata=client.V1ObjectMeta(name=volume_name),
                    spec=client.V1PersistentVolumeSpec(
                        capacity={"storage": size},
                        access_modes=["ReadWriteOnce"],
                        storage_class_name="",
                        host_path=client.V1HostPathVolumeSource(path=str(host_path)),
                        claim_ref=client.V1ObjectReference(namespace=namespace, name=claim),
                    ),
                ),
            ),
        ),
        (
            core.create_namespaced_persistent_volume_claim,
            (
                namespace,
                client.V1PersistentVolumeClaim(
                    metadata=client.V1ObjectMeta(name=claim),
                    spec=client.V1PersistentVolumeClaimSpec(
                        access_modes=["ReadWriteOnce"],
                        storage_class_name="",
                        volume_name=volume_name,
                        resources=client.V1VolumeResourceRequirements(requests={"storage": size}),
                    ),
                ),
            ),
        ),
    ]
    for create, args in objects:
        try:
            create(*args)
        except ApiException as err:
            if err.status != 409:
                raise
