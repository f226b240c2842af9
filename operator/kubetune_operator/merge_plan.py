"""What a ModelMerge needs, as pure functions: its parents checked, the CPU Job that
merges them, and the RegisteredModel that records the result with its lineage.

The checks that need only the parents' records (one base model, methods that can
be merged, equal ranks where the method combines the adapters' matrices
element-wise) run here, before any pod starts; what needs the weights (their
digests, the tokenizers) the merge pod checks itself.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import ValidationError

from kubetune.api import merge as mm
from kubetune.api import registeredmodel as rm
from kubetune.api.common import VolumeLocation
from kubetune.api.finetuningjob import FineTuningMethod
from kubetune.api.merge import MergeFormat, MergeMethod, ModelMergeSpec
from kubetune.api.trainer import TERMINATION_MESSAGE_PATH, TrainerMode
from kubetune_operator import naming
from kubetune_operator.builders import (
    CACHE_DIR,
    CONFIG_DIR,
    CONFIG_FILE,
    CONTAINER,
    Obj,
    claim_volumes,
    mounted_path,
    pod_volumes,
    security_contexts,
)
from kubetune_operator.registration import MAX_NAME, serving_hints
from kubetune_operator.settings import OperatorSettings

LORA_METHODS = (FineTuningMethod.LORA, FineTuningMethod.QLORA)
ADAPTER, FULL = rm.ArtifactKind.ADAPTER, rm.ArtifactKind.FULL


class Parent:
    """A parent RegisteredModel, read from its record."""

    def __init__(self, source: mm.MergeSource, body: Obj) -> None:
        self.source, self.body = source, body
        self.name = source.model
        self.uid = body["metadata"].get("uid", "")
        self.spec = rm.RegisteredModelSpec.model_validate(body["spec"])

    @property
    def weights(self) -> str:
        """adapter (LoRA or virtual tokens, on top of the base) or full weights."""
        return ADAPTER if self.spec.artifact.kind == ADAPTER else FULL

    @property
    def rank(self) -> int | None:
        lora = self.spec.adapter.lora
        return lora.rank if lora and self.weights == ADAPTER else None


def resolve_parents(
    spec: ModelMergeSpec, registered: dict[str, Obj | None]
) -> tuple[list[Parent], list[str], list[str]]:
    """The parents found, the names not registered (yet), and records that cannot be read."""
    parents, missing, unreadable = [], [], []
    for source in spec.models:
        body = registered.get(source.model)
        if body is None:
            missing.append(source.model)
            continue
        try:
            parents.append(Parent(source, body))
        except ValidationError:
            unreadable.append(source.model)
    return parents, missing, unreadable


def _base_of(parent: Parent) -> tuple:
    base = parent.spec.base_model
    volume = (base.volume.claim_name, base.volume.path.strip("/")) if base.volume else None
    return base.name, base.revision, volume


def _describe_base(parent: Parent) -> str:
    name, revision, volume = _base_of(parent)
    where = f" from {volume[0]}:{volume[1]}" if volume else f"@{revision}"
    return f"{name}{where}"


def incompatibility(spec: ModelMergeSpec, parents: list[Parent]) -> str | None:
    """Why these models cannot be merged with this method, naming the models and the
    fix; None when they can."""
    first = parents[0]
    for other in parents[1:]:
        if _base_of(other) != _base_of(first):
            return (
                f"{first.name} and {other.name} were fine-tuned from different base models "
                f"({_describe_base(first)} and {_describe_base(other)}): only models of one "
                "base model (same name, revision and volume) can be merged"
            )
    for parent in parents:
        if parent.weights == ADAPTER and parent.spec.method not in LORA_METHODS:
            return (
                f"{parent.name} is a {parent.spec.method.value} adapter: only LoRA adapters "
                "(LORA, QLORA) and full weights can be merged"
            )
    kinds = {p.weights for p in parents}
    if len(kinds) > 1:
        adapter = next(p for p in parents if p.weights == ADAPTER)
        full = next(p for p in parents if p.weights == FULL)
        return (
            f"{adapter.name} is a LoRA adapter and {full.name} full weights: merge adapters "
            f"with adapters, or fold the adapters into full weights first (a ModelMerge "
            f"with format: full)"
        )
    if kinds == {ADAPTER}:
        if spec.method not in mm.ADAPTER_METHODS:
            return (
                f"{spec.method.value} interpolates full weights, and these are LoRA adapters: "
                f"use one of {', '.join(m.value for m in mm.ADAPTER_METHODS)}"
            )
        ranks = {p.name: p.rank for p in parents}
        if spec.method in mm.EQUAL_RANK_METHODS and len(set(ranks.values())) > 1:
            shown = ", ".join(f"{name} r={rank}" for name, rank in ranks.items())
            return (
                f"{spec.method.value} combines the adapters' matrices element-wise and needs "
                f"equal LoRA ranks ({shown}): use svd, which merges adapters of any ranks"
            )
    elif spec.format == MergeFormat.ADAPTER:
        return (
            f"{first.name} and the others are full fine-tunes: their merge is full weights, "
            "not an adapter (leave spec.format out, or set it to full)"
        )
    elif spec.method not in mm.FULL_METHODS:
        return (
            f"{spec.method.value} factors merged adapters, and these are full weights: use one "
            f"of {', '.join(m.value for m in mm.FULL_METHODS)}"
        )
    return None


def output_location(body: Obj, spec: ModelMergeSpec) -> VolumeLocation:
    """The merge's own folder of the output volume, as a job's is."""
    meta = body["metadata"]
    folder = f"{meta['name']}-{meta['uid'].split('-')[0]}"
    parts = (spec.output.volume.path.strip("/"), folder)
    return VolumeLocation(
        claim_name=spec.output.volume.claim_name, path="/".join(p for p in parts if p)
    )


def result_format(spec: ModelMergeSpec, parents: list[Parent]) -> MergeFormat:
    """Adapters stay an adapter unless asked; full fine-tunes give full weights."""
    if parents[0].weights == ADAPTER:
        return spec.format or MergeFormat.ADAPTER
    return MergeFormat.FULL


def merge_config(body: Obj, spec: ModelMergeSpec, parents: list[Parent]) -> mm.MergeConfig:
    base = parents[0].spec.base_model
    meta = body["metadata"]
    return mm.MergeConfig(
        name=meta["name"],
        namespace=meta["namespace"],
        base_model=mounted_path(base.volume) if base.volume else base.name,
        base_revision=None if base.volume else base.revision,
        parents=[
            mm.MergeParent(
                name=p.name,
                path=mounted_path(p.spec.artifact.volume),
                kind=p.weights,
                weight=p.source.weight,
                digest=p.spec.artifact.digest,
            )
            for p in parents
        ],
        method=spec.method,
        density=spec.density,
        majority_sign_method=spec.majority_sign_method,
        svd_rank=spec.svd_rank,
        format=result_format(spec, parents),
        output=mounted_path(output_location(body, spec)),
        cache=f"{CACHE_DIR}/huggingface",
    )


def _claims(spec: ModelMergeSpec, parents: list[Parent]) -> dict[str, bool]:
    """Each claim the merge reads (read-only) or writes."""
    claims: dict[str, bool] = {}
    base = parents[0].spec.base_model
    reads = [p.spec.artifact.volume for p in parents] + ([base.volume] if base.volume else [])
    for location in reads:
        claims.setdefault(location.claim_name, False)
    claims[spec.output.volume.claim_name] = True
    return claims


def desired_merge_job(
    body: Obj, spec: ModelMergeSpec, parents: list[Parent], settings: OperatorSettings
) -> Obj:
    """The batch/v1 Job that merges: one CPU pod of the trainer image, no API rights."""
    meta = body["metadata"]
    owner = meta["name"]
    config = merge_config(body, spec, parents).model_dump_json(by_alias=True, exclude_none=True)
    volumes, mounts = pod_volumes(shared_memory=False)
    claim_vols, claim_mounts = claim_volumes(_claims(spec, parents))
    volumes += claim_vols
    mounts += claim_mounts
    env = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    base = parents[0].spec.base_model
    if base.token_secret_ref and not base.volume:
        ref = base.token_secret_ref  # by reference only: the value is in no object we write
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    pod_security, container_security = security_contexts()
    labels = naming.labels(owner, meta["uid"], naming.COMPONENT_MERGER)
    resources = spec.resources
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_security,
        "containers": [
            {
                "name": CONTAINER,
                "image": spec.image or settings.trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": [
                    "python",
                    "-m",
                    "kubetune_trainer",
                    "--config",
                    f"{CONFIG_DIR}/{CONFIG_FILE}",
                    "--mode",
                    TrainerMode.MERGE.value,
                ],
                "env": env,
                "resources": {
                    "requests": {"cpu": resources.cpu, "memory": resources.memory},
                    "limits": {"memory": resources.memory},
                },
                "volumeMounts": mounts,
                "securityContext": container_security,
                "terminationMessagePath": TERMINATION_MESSAGE_PATH,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": volumes,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": naming.merge_job_name(owner),
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [naming.owner_reference(body)],
        },
        "spec": {
            # A merge is deterministic: a failure is the input's, not worth a retry.
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": settings.finished_job_ttl_seconds,
            "template": {
                "metadata": {
                    "labels": {**spec.pod_metadata.labels, **labels},
                    "annotations": {
                        **spec.pod_metadata.annotations,
                        naming.ANNOTATION_MERGE: owner,
                        naming.ANNOTATION_TRAINER_CONFIG: config,
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def merged_model_name(body: Obj, spec: ModelMergeSpec) -> str:
    return (spec.model_name or body["metadata"]["name"])[:MAX_NAME]


def desired_merged_model(
    body: Obj,
    spec: ModelMergeSpec,
    parents: list[Parent],
    report: mm.MergeReport,
    image: str,
) -> Obj:
    """The RegisteredModel of the merged model: not owned by the merge, it outlives it."""
    meta = body["metadata"]
    name = merged_model_name(body, spec)
    adapters = parents[0].weights == ADAPTER
    fmt = result_format(spec, parents)
    kind = ADAPTER if fmt == MergeFormat.ADAPTER else (rm.ArtifactKind.MERGED if adapters else FULL)
    artifact = rm.Artifact(volume=output_location(body, spec), kind=kind, digest=report.digest)
    method, adapter = FineTuningMethod.FULL, rm.AdapterSettings()
    if fmt == MergeFormat.ADAPTER:
        # QLoRA parents' merge is still meant for their quantised base.
        qlora = next((p for p in parents if p.spec.method == FineTuningMethod.QLORA), None)
        method = FineTuningMethod.QLORA if qlora else FineTuningMethod.LORA
        adapter = rm.AdapterSettings(
            lora=_merged_lora(parents, report),
            quantization=qlora.spec.adapter.quantization if qlora else None,
        )
    lineage = rm.MergeLineage(
        method=spec.method,
        format=fmt,
        parents=[
            rm.ParentModel(
                name=p.name,
                uid=p.uid,
                digest=p.spec.artifact.digest,
                weight=p.source.weight,
                method=p.spec.method,
                source_job=p.spec.source_job.name if p.spec.source_job else None,
            )
            for p in parents
        ],
        density=spec.density
        if spec.density is not None
        else (0.5 if spec.method in mm.DENSITY_METHODS else None),
        majority_sign_method=spec.majority_sign_method
        if spec.method in (MergeMethod.TIES, MergeMethod.DARE_TIES)
        else None,
        svd_rank=report.rank if spec.method == MergeMethod.SVD else None,
        source=rm.SourceMerge(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
    )
    model_spec = rm.RegisteredModelSpec(
        base_model=parents[0].spec.base_model,
        method=method,
        adapter=adapter,
        artifact=artifact,
        merge=lineage,
        trainer_image=image,
        trained_at=report.completed_at,
        serving=serving_hints(parents[0].spec.base_model, method, name, artifact),
    )
    labels = {
        naming.LABEL_NAME: "kubetune",
        naming.LABEL_PART_OF: "kubetune",
        naming.LABEL_MANAGED_BY: naming.MANAGER,
        naming.LABEL_MERGE_UID: meta["uid"],
        "kubetune.dev/method": method.value.lower().replace("_", "-"),
    }
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": rm.KIND,
        "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels},
        "spec": model_spec.to_api(),
    }


def _merged_lora(parents: list[Parent], report: mm.MergeReport) -> rm.LoraSettings:
    """The merged adapter's settings as the merge pod saved them (PEFT sets the new rank,
    its alpha, and the union of the parents' target modules)."""
    lora = parents[0].spec.adapter.lora or rm.LoraSettings()
    update: dict = {}
    if report.rank:
        update["rank"] = report.rank
    if report.lora_alpha is not None:
        update["alpha"] = report.lora_alpha
    if report.target_modules:
        update["target_modules"] = sorted(report.target_modules)
    return lora.model_copy(update=update)


def made_by(model: Obj, uid: str) -> bool:
    """Whether a RegisteredModel records this merge's result (names can be taken)."""
    source = (((model.get("spec") or {}).get("merge") or {}).get("source")) or {}
    return source.get("uid") == uid


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
