"""Pure functions that build the objects a FineTuningJob needs.

Each returns a plain dict ready for the API server. Nothing here talks to the
cluster, so every shape is unit-tested directly.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubetune.api.common import VolumeLocation
from kubetune.api.defaults import processes_per_node, resolve_hyperparameters, world_size
from kubetune.api.finetuningjob import FILE_FORMATS, FineTuningJobSpec
from kubetune.api.trainer import (
    NON_RETRYABLE_EXIT_CODES,
    TERMINATION_MESSAGE_PATH,
    JobIdentity,
    ReportEndpoint,
    ReportTarget,
    TrainerConfig,
    TrainerMode,
    TrainerPaths,
)
from kubetune_operator import naming
from kubetune_operator.settings import OperatorSettings

CONTAINER = "trainer"
CONFIG_FILE = "config.json"
CONFIG_DIR = "/etc/kubetune"
VOLUMES_DIR = "/mnt/volumes"
CACHE_DIR = "/cache"
REPORT_TOKEN_DIR = "/var/run/secrets/kubetune"
REPORT_TOKEN_SECONDS = 3600  # the kubelet renews it at 80% of that
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
TRAINER_UID = 10001  # the trainer image's user
RENDEZVOUS_PORT = 29500  # torchrun's default master port, served by the pod of index 0

Obj = dict[str, Any]


# Fields the operator acts on without a new Job: suspending patches the Job,
# cancelling deletes it. Toggling them must not replace the Job (under Kueue that
# would lose its Workload).
_NOT_IN_POD = ("suspend", "cancel")


def spec_hash(spec: FineTuningJobSpec) -> str:
    """What the training pods are built from; changes to anything else keep the Job."""
    document = {k: v for k, v in spec.to_api().items() if k not in _NOT_IN_POD}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def spec_applied(job: Obj, spec: FineTuningJobSpec) -> bool:
    """Whether this Job was built from the spec as it is now."""
    annotations = job["metadata"].get("annotations") or {}
    return annotations.get(naming.ANNOTATION_SPEC_HASH) == spec_hash(spec)


def _meta(body: Obj, name: str, component: str, **extra: Any) -> Obj:
    meta = body["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": naming.labels(meta["name"], meta["uid"], component),
        "ownerReferences": [naming.owner_reference(body)],
        **extra,
    }


def _claims(spec: FineTuningJobSpec) -> dict[str, bool]:
    """Each PersistentVolumeClaim the trainer uses, and whether it must be writable."""
    claims: dict[str, bool] = {}
    for location, writable in (
        (spec.base_model.volume, False),
        (spec.dataset.volume, False),
        (_evaluation_volume(spec), False),
        (spec.output.volume, True),
    ):
        if location is not None:
            claims[location.claim_name] = claims.get(location.claim_name, False) or writable
    return claims


def _evaluation_volume(spec: FineTuningJobSpec) -> VolumeLocation | None:
    data = spec.evaluation.data if spec.evaluation else None
    return data.volume if data else None


def mounted_path(location: VolumeLocation) -> str:
    """Where a volume location appears inside the trainer's container."""
    base = f"{VOLUMES_DIR}/{location.claim_name}"
    return f"{base}/{location.path.strip('/')}" if location.path.strip("/") else base


def trainer_config(body: Obj, spec: FineTuningJobSpec, settings: OperatorSettings) -> TrainerConfig:
    meta = body["metadata"]
    return TrainerConfig(
        job=JobIdentity(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=meta.get("generation", 1),
        ),
        spec=spec,
        hyperparameters=resolve_hyperparameters(spec),
        paths=TrainerPaths(
            base_model=mounted_path(spec.base_model.volume) if spec.base_model.volume else None,
            dataset=mounted_path(spec.dataset.volume)
            if spec.dataset.volume and spec.dataset.format in FILE_FORMATS
            else None,
            evaluation=mounted_path(volume) if (volume := _evaluation_volume(spec)) else None,
            output=mounted_path(spec.output.job_location(meta["name"], meta["uid"])),
            cache=f"{CACHE_DIR}/huggingface",
        ),
        report=ReportTarget(endpoint=report_endpoint(settings)),
    )


def report_endpoint(settings: OperatorSettings) -> ReportEndpoint | None:
    if not (settings.report_url and settings.report_port):
        return None
    return ReportEndpoint(
        url=settings.report_url,
        token_file=f"{REPORT_TOKEN_DIR}/token",
        ca_pem=settings.report_ca_pem,
    )


def trainer_config_annotation(
    body: Obj, spec: FineTuningJobSpec, settings: OperatorSettings
) -> str:
    """The trainer's resolved configuration, carried by its pod template and projected
    into the pod as a file (downward API): no ConfigMap to create, watch or clean up,
    and it cannot drift from the pods it configures."""
    return trainer_config(body, spec, settings).model_dump_json(by_alias=True, exclude_none=True)


def _cpu_threads(quantity: str, processes: int) -> int:
    """Whole CPUs of the request per training process (at least one)."""
    cores = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return max(1, int(cores // processes))


def _env(spec: FineTuningJobSpec, mode: TrainerMode = TrainerMode.TRAIN) -> list[Obj]:
    env: list[Obj] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "KUBETUNE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    processes = processes_per_node(spec)
    if mode == TrainerMode.TRAIN and spec.resources.gpus == 0 and processes > 1:
        # torchrun would give each process one thread: share the pod's CPUs instead.
        threads = _cpu_threads(spec.resources.cpu, processes)
        env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    # Secrets by reference only: the value never appears in any object we write.
    if spec.base_model.token_secret_ref:
        ref = spec.base_model.token_secret_ref
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    if spec.dataset.token_secret_ref:
        ref = spec.dataset.token_secret_ref
        env.append(
            {
                "name": "KUBETUNE_DATASET_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    return env


def pod_volumes(*, shared_memory: bool = True) -> tuple[list[Obj], list[Obj]]:
    """The volumes every trainer-image pod has: its configuration (the pod's own
    annotation, projected as a file by the downward API), a cache, /tmp (the root file
    system is read-only), and, for training's data loaders, shared memory."""
    config_field = f"metadata.annotations['{naming.ANNOTATION_TRAINER_CONFIG}']"
    volumes: list[Obj] = [
        {
            "name": "config",
            "downwardAPI": {
                "items": [{"path": CONFIG_FILE, "fieldRef": {"fieldPath": config_field}}]
            },
        },
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Obj] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if shared_memory:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def claim_volumes(claims: dict[str, bool]) -> tuple[list[Obj], list[Obj]]:
    """One volume per PersistentVolumeClaim (name to writable), mounted under VOLUMES_DIR."""
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    for index, (claim, writable) in enumerate(sorted(claims.items())):
        name = f"data-{index}"
        volumes.append(
            {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}}
        )
        mounts.append(
            {"name": name, "mountPath": f"{VOLUMES_DIR}/{claim}", "readOnly": not writable}
        )
    return volumes, mounts


def _volumes(
    spec: FineTuningJobSpec, settings: OperatorSettings, *, writable_output: bool
) -> tuple[list[Obj], list[Obj]]:
    volumes, mounts = pod_volumes()
    if report_endpoint(settings) is not None:
        # The pod's only credential: a token for the operator's audience, which proves
        # to the report endpoint which pod is speaking and is worth nothing elsewhere.
        token = {
            "audience": settings.report_audience,
            "expirationSeconds": REPORT_TOKEN_SECONDS,
            "path": "token",
        }
        volumes.append(
            {"name": "report-token", "projected": {"sources": [{"serviceAccountToken": token}]}}
        )
        mounts.append({"name": "report-token", "mountPath": REPORT_TOKEN_DIR, "readOnly": True})
    claims = {c: w and writable_output for c, w in _claims(spec).items()}
    claim_vols, claim_mounts = claim_volumes(claims)
    volumes += claim_vols
    mounts += claim_mounts
    return volumes, mounts


def security_contexts() -> tuple[Obj, Obj]:
    """Meets the restricted Pod Security Standard."""
    pod = {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    return pod, container


def _pod_failure_policy() -> Obj:
    return {
        "rules": [
            # Bad input: running again cannot help.
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": list(NON_RETRYABLE_EXIT_CODES),
                },
            },
            # Preemption, eviction, node drain: retry without counting a failure.
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
        ]
    }


def multi_pod(spec: FineTuningJobSpec) -> bool:
    return spec.resources.nodes > 1


def trainer_command(spec: FineTuningJobSpec, mode: TrainerMode, owner: str) -> list[str]:
    """The container command: the trainer itself, or torchrun starting one trainer per GPU
    (per CPU process) on each pod. Pods find each other at the pod of completion index 0
    through the rendezvous Service; torchrun's node rank is the pod's completion index."""
    trainer = ["-m", "kubetune_trainer", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"]
    trainer += ["--mode", mode.value]
    processes = processes_per_node(spec)
    if mode != TrainerMode.TRAIN or world_size(spec) == 1:
        return ["python", *trainer]
    launcher = ["python", "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    if not multi_pod(spec):
        return [*launcher, "--standalone", *trainer]
    master = f"{naming.train_job_name(owner)}-0.{naming.rendezvous_service_name(owner)}"
    return [
        *launcher,
        f"--nnodes={spec.resources.nodes}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={master}",
        f"--master-port={RENDEZVOUS_PORT}",
        *trainer,
    ]


def desired_rendezvous_service(body: Obj) -> Obj:
    """Headless, so each pod of the Indexed Job gets `<job>-<index>.<service>` in DNS;
    published before the pods are ready, since they meet before any of them is."""
    owner = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(body, naming.rendezvous_service_name(owner), naming.COMPONENT_TRAINER),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": naming.train_job_name(owner)},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }


def _spread(owner: str, uid: str) -> Obj:
    """Prefer one pod per node: a multi-pod job trains across nodes, but a single node
    that can hold them all (a development machine) still runs it."""
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {
                            "matchLabels": {
                                naming.LABEL_JOB_UID: uid,
                                naming.LABEL_COMPONENT: naming.COMPONENT_TRAINER,
                            }
                        },
                    },
                }
            ]
        }
    }


def desired_job(
    body: Obj,
    spec: FineTuningJobSpec,
    settings: OperatorSettings,
    mode: TrainerMode,
    *,
    suspend: bool,
    restart: int = 0,
) -> Obj:
    """The batch/v1 Job that validates the dataset (CPU only) or trains (with GPUs)."""
    meta = body["metadata"]
    owner = meta["name"]
    training = mode == TrainerMode.TRAIN
    component = naming.COMPONENT_TRAINER if training else naming.COMPONENT_VALIDATOR
    name = naming.train_job_name(owner) if training else naming.validate_job_name(owner)
    image = spec.image or settings.trainer_image
    resources = spec.resources

    if training:
        requests: Obj = {"cpu": resources.cpu, "memory": resources.memory}
        limits: Obj = {"memory": resources.memory}
        if resources.gpus:
            requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(resources.gpus)
    else:
        requests = {"cpu": settings.validator_cpu, "memory": settings.validator_memory}
        limits = {"memory": settings.validator_memory}

    tolerations = [t.to_api() for t in resources.tolerations]
    node_selector: Obj = {}
    if training:
        node_selector = dict(resources.node_selector)
        if resources.gpu_type:
            node_selector[GPU_PRODUCT_LABEL] = resources.gpu_type
        if resources.gpus:
            tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})

    volumes, mounts = _volumes(spec, settings, writable_output=training)
    pod_security, container_security = security_contexts()
    pod_labels = {**spec.pod_metadata.labels, **naming.labels(owner, meta["uid"], component)}
    pod_spec: Obj = {
        "restartPolicy": "Never",
        # The namespace's default ServiceAccount, without its API token: the trainer
        # needs no rights in the cluster.
        "automountServiceAccountToken": False,
        "securityContext": pod_security,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "containers": [
            {
                "name": CONTAINER,
                "image": image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": trainer_command(spec, mode, owner),
                "env": _env(spec, mode),
                "resources": {"requests": requests, "limits": limits},
                "volumeMounts": mounts,
                "securityContext": container_security,
                "terminationMessagePath": TERMINATION_MESSAGE_PATH,
                # A crash before the trainer writes its message still leaves the log's tail.
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": volumes,
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    distributed = training and multi_pod(spec)
    if training and resources.affinity:
        pod_spec["affinity"] = resources.affinity
    elif distributed:
        pod_spec["affinity"] = _spread(owner, meta["uid"])
    if distributed:
        pod_spec["subdomain"] = naming.rendezvous_service_name(owner)
    if resources.priority_class_name:
        pod_spec["priorityClassName"] = resources.priority_class_name

    job_labels = naming.labels(owner, meta["uid"], component)
    queue = (meta.get("labels") or {}).get(naming.KUEUE_QUEUE_LABEL)
    if queue and training:
        job_labels[naming.KUEUE_QUEUE_LABEL] = queue

    pod_annotations = {
        **spec.pod_metadata.annotations,
        naming.ANNOTATION_OWNER: owner,
        naming.ANNOTATION_TRAINER_CONFIG: trainer_config_annotation(body, spec, settings),
    }
    job_annotations = {naming.ANNOTATION_SPEC_HASH: spec_hash(spec)}
    if distributed:
        pod_annotations[naming.ANNOTATION_RESTART] = str(restart)
        job_annotations[naming.ANNOTATION_RESTART] = str(restart)
    job_spec: Obj = {
        "suspend": suspend,
        # Several pods fail or succeed together: the first failure ends the attempt, and
        # the operator restarts all of them (see status.py). One pod retries in place.
        "backoffLimit": 0 if distributed or not training else spec.max_retries,
        "podFailurePolicy": _pod_failure_policy(),
        "ttlSecondsAfterFinished": settings.finished_job_ttl_seconds,
        "template": {
            "metadata": {"labels": pod_labels, "annotations": pod_annotations},
            "spec": pod_spec,
        },
    }
    if distributed:
        nodes = spec.resources.nodes
        job_spec |= {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes}
    if training and spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(body, name, component, annotations=job_annotations)
        | {"labels": job_labels},
        "spec": job_spec,
    }
