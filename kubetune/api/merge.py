"""ModelMerge: several RegisteredModels of one base model combined into a new one.

A ModelMerge names the models to combine with a weight each, and a method:
LoRA adapters are combined with PEFT's weighted-adapter methods (linear, TIES,
DARE, SVD) and kept as an adapter or merged into full weights; full fine-tunes
are combined as task vectors over their base (linear, TIES, DARE) or
interpolated (SLERP). The operator checks that the models can be merged (one
base model, one tokenizer, equal ranks where the method needs them), runs the
merge in a CPU Job of the trainer image, and registers the result as a
RegisteredModel whose lineage lists its parents, their digests and weights.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from kubetune.api.common import (
    CONDITIONS_LIST_MAP,
    DNS_SUBDOMAIN,
    NAME_MAX,
    ApiModel,
    Condition,
    VolumeLocation,
    cel,
    validations,
)
from kubetune.api.finetuningjob import PodMetadata

KIND = "ModelMerge"
PLURAL = "modelmerges"
SHORT_NAME = "mm"

MAX_MODELS = 8


class MergeMethod(StrEnum):
    """How the models' weights are combined."""

    LINEAR = "linear"  # weighted sum (adapters: of A and B; full: of the weights)
    TIES = "ties"  # trim to the largest changes, elect a sign, average the agreeing ones
    DARE_LINEAR = "dare_linear"  # drop changes at random, rescale, weighted sum
    DARE_TIES = "dare_ties"  # DARE's random drop, then TIES' sign election
    SVD = "svd"  # adapters only: the weighted sum of the updates, factored again (SVD)
    SLERP = "slerp"  # full weights only, two models: spherical interpolation


# Methods that combine sparsified task vectors, and take a density.
DENSITY_METHODS = (MergeMethod.TIES, MergeMethod.DARE_LINEAR, MergeMethod.DARE_TIES)
# PEFT combines the adapters' A and B matrices element-wise for these: equal ranks only.
EQUAL_RANK_METHODS = (
    MergeMethod.LINEAR,
    MergeMethod.TIES,
    MergeMethod.DARE_LINEAR,
    MergeMethod.DARE_TIES,
)
ADAPTER_METHODS = (
    MergeMethod.LINEAR,
    MergeMethod.TIES,
    MergeMethod.DARE_LINEAR,
    MergeMethod.DARE_TIES,
    MergeMethod.SVD,
)
FULL_METHODS = (*DENSITY_METHODS, MergeMethod.LINEAR, MergeMethod.SLERP)


class MergeFormat(StrEnum):
    """What a merge of LoRA adapters writes."""

    ADAPTER = "adapter"  # one LoRA adapter, served on top of the base model
    FULL = "full"  # the base model with the merged adapter folded in


class SignMethod(StrEnum):
    TOTAL = "total"
    FREQUENCY = "frequency"


class MergeSource(ApiModel):
    """One model to merge, and its weight."""

    model: str = Field(
        description="Name of a RegisteredModel in the merge's namespace.",
        max_length=NAME_MAX,
        pattern=DNS_SUBDOMAIN,
    )
    weight: float = Field(
        default=1.0,
        description="Its weight (negative subtracts the model's change). For SLERP the "
        "weights say where between the two models to land: t = second / (first + second).",
        ge=-10.0,
        le=10.0,
    )


class MergeResources(ApiModel):
    """The merge runs on CPUs: it loads every parent once, one after the other."""

    cpu: str = Field(default="2", description="CPU request.", max_length=32)
    memory: str = Field(
        default="8Gi",
        description="Memory request and limit: about three times the base model's size "
        "in float32 for a full merge, twice for an adapter merge.",
        max_length=32,
    )


class MergeOutput(ApiModel):
    """Where the merged model is written."""

    volume: VolumeLocation = Field(
        description="Folder on a PersistentVolumeClaim; the merge writes in its own "
        "sub-folder <merge name>-<first part of its uid>."
    )


class ModelMergeSpec(ApiModel):
    """Which models to combine, how, and where the result goes. Immutable once created."""

    models: list[MergeSource] = Field(
        description="The models to combine (two or more, all of one base model).",
        min_length=2,
        max_length=MAX_MODELS,
    )
    method: MergeMethod = Field(description="How their weights are combined.")
    density: float | None = Field(
        default=None,
        description="ties, dare_linear, dare_ties: the fraction of each model's changes kept "
        "(default 0.5).",
        gt=0.0,
        le=1.0,
    )
    majority_sign_method: SignMethod = Field(
        default=SignMethod.TOTAL,
        description="ties, dare_ties: elect each parameter's sign by the total change "
        "(total) or by how many models agree (frequency).",
    )
    svd_rank: int | None = Field(
        default=None,
        description="svd: rank of the merged adapter (default: the largest parent rank; the "
        "sum of the parents' ranks reproduces their weighted sum exactly).",
        ge=1,
        le=1024,
    )
    format: MergeFormat | None = Field(
        default=None,
        description="LoRA parents: keep the merged adapter (adapter, the default) or fold it "
        "into the base model's weights (full). Full fine-tunes always give full weights "
        "(leave it out, or full).",
    )
    output: MergeOutput = Field(description="Where the merged model is written.")
    model_name: str | None = Field(
        default=None,
        description="Name of the RegisteredModel the merge records (default: the merge's name).",
        max_length=NAME_MAX,
        pattern=DNS_SUBDOMAIN,
    )
    resources: MergeResources = Field(
        default_factory=MergeResources, description="The merge pod's CPU and memory."
    )
    image: str | None = Field(
        default=None,
        description="Trainer image to merge with (default: the operator's).",
        max_length=512,
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Labels and annotations for the merge pod."
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.models.all(m, self.models.exists_one(o, o.model == m.model))",
                "each model may be listed once",
                field_path=".models",
            ),
            cel(
                "self.method != 'slerp' || size(self.models) == 2",
                "slerp interpolates between exactly two models",
                field_path=".models",
            ),
            cel(
                "self.method != 'slerp' || (self.models.all(m, m.weight >= 0.0) "
                "&& self.models.exists(m, m.weight > 0.0))",
                "slerp weights must be non-negative and not both zero",
                field_path=".models",
            ),
            cel(
                "!has(self.density) || self.method in "
                + "["
                + ", ".join(f"'{m.value}'" for m in DENSITY_METHODS)
                + "]",
                "density applies to ties, dare_linear and dare_ties only",
                field_path=".density",
            ),
            cel(
                "!has(self.svdRank) || self.method == 'svd'",
                "svdRank applies to the svd method only",
                field_path=".svdRank",
            ),
            cel(
                "self.models.exists(m, m.weight != 0.0)",
                "at least one weight must be non-zero",
                field_path=".models",
            ),
        )
    }


class MergePhase(StrEnum):
    PENDING = "Pending"  # waiting for its models to be registered
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ModelMergeStatus(ApiModel):
    """Observed state, written by the operator only."""

    phase: MergePhase = Field(default=MergePhase.PENDING, description="Display summary.")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Detailed state: ModelsReady (the models exist and can be merged), "
        "Running, Succeeded, Failed, Registered, and Ready (the merged model is registered).",
        max_length=8,
        json_schema_extra=CONDITIONS_LIST_MAP,
    )
    job_name: str | None = Field(default=None, description="The Job running the merge.")
    registered_model: str | None = Field(
        default=None, description="The RegisteredModel of the merged model."
    )
    digest: str | None = Field(
        default=None, description="sha256 of the merged weights.", max_length=128
    )
    start_time: datetime | None = Field(default=None, description="When the merge Job started.")
    completion_time: datetime | None = Field(default=None, description="When the merge ended.")


class ModelMerge(ApiModel):
    """A merge of RegisteredModels into a new one."""

    api_version: str = Field(default="kubetune.dev/v1alpha1", description="kubetune.dev/v1alpha1")
    kind: str = Field(default=KIND, description=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ModelMergeSpec = Field(
        description="The merge; written once.",
        json_schema_extra=validations(cel("self == oldSelf", "a ModelMerge's spec is immutable")),
    )
    status: ModelMergeStatus | None = Field(default=None, description="Observed state.")


# --- The contract with the merge pod -------------------------------------------------


class MergeParent(ApiModel):
    """A parent as the merge pod sees it: where its weights are, what it is."""

    name: str = Field(description="RegisteredModel name.")
    path: str = Field(description="Folder of its weights inside the pod.")
    kind: str = Field(description="adapter or full.")
    weight: float = Field(description="Its weight.")
    digest: str = Field(description="The digest its RegisteredModel records (checked).")


class MergeConfig(ApiModel):
    """Everything the merge pod needs, resolved by the operator."""

    name: str = Field(description="The ModelMerge's name.")
    namespace: str = Field(default="default", description="Its namespace.")
    base_model: str = Field(description="Folder of the base model, or its Hub name.")
    base_revision: str | None = Field(default=None, description="Hub revision of the base model.")
    parents: list[MergeParent] = Field(description="The models to combine, in order.")
    method: MergeMethod = Field(description="How.")
    density: float | None = Field(default=None, description="ties/dare: fraction kept.")
    majority_sign_method: SignMethod = Field(default=SignMethod.TOTAL, description="ties: sign.")
    svd_rank: int | None = Field(default=None, description="svd: rank of the result.")
    format: MergeFormat = Field(description="adapter or full (LoRA parents).")
    output: str = Field(description="Folder to write the merged model to.")
    cache: str | None = Field(default=None, description="Hugging Face cache folder.")


class MergeReport(ApiModel):
    """What the merge pod wrote: its termination message on success."""

    kind: str = Field(description="adapter or full.")
    digest: str = Field(description="sha256:<hex> over the weight files.")
    rank: int | None = Field(default=None, description="Rank of a merged adapter.")
    lora_alpha: int | None = Field(
        default=None, description="lora_alpha of a merged adapter, as saved."
    )
    target_modules: list[str] | None = Field(
        default=None, description="Modules a merged adapter adapts, as saved."
    )
    parameters_changed: float | None = Field(
        default=None, description="Fraction of the base model's weights the merge changed."
    )
    completed_at: datetime = Field(description="When the merge finished.")
