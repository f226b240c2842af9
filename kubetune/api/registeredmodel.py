"""RegisteredModel: the record of a trained model, its lineage and how to serve it.

Created by the operator when a FineTuningJob succeeds, in the job's
namespace, and kept when the job is deleted. Its spec is written once and
never changes.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from kubetune.api.common import NAME_MAX, TEXT_MAX, ApiModel, VolumeLocation, cel, validations
from kubetune.api.evaluation import EvaluationResult
from kubetune.api.finetuningjob import (
    BaseModelSource,
    CustomLoader,
    DatasetFormat,
    FineTuningMethod,
    HuggingFaceDataset,
    LoraSettings,
    QuantizationSettings,
    ResolvedHyperparameters,
    VirtualTokenSettings,
)
from kubetune.api.merge import MergeFormat, MergeMethod, SignMethod

KIND = "RegisteredModel"
PLURAL = "registeredmodels"
SHORT_NAME = "rm"


class ArtifactKind:
    ADAPTER = "adapter"
    FULL = "full"
    MERGED = "merged"


class Artifact(ApiModel):
    """Where the weights are and how to check them."""

    volume: VolumeLocation = Field(
        description="Folder holding the model (safetensors, tokenizer, model card)."
    )
    kind: str = Field(
        description="adapter (load on top of the base model), full (complete weights) or merged.",
        json_schema_extra={"enum": ["adapter", "full", "merged"]},
    )
    digest: str = Field(
        description="sha256 over the weight files, as sha256:<hex>.", max_length=128
    )
    merged_volume: VolumeLocation | None = Field(
        default=None, description="Folder holding the base model with the adapter merged, if saved."
    )


class DatasetLineage(ApiModel):
    """The data the model was trained on."""

    format: DatasetFormat = Field(description="Dataset format.")
    volume: VolumeLocation | None = Field(default=None, description="File or folder of the data.")
    hugging_face: HuggingFaceDataset | None = Field(
        default=None, alias="huggingFace", description="Hub dataset."
    )
    custom: CustomLoader | None = Field(default=None, description="Custom loader.")
    digest: str = Field(default="", description="sha256 of the prepared dataset.", max_length=128)
    preprocessing_steps: int = Field(
        default=0, description="Number of preprocessing steps applied."
    )


class AdapterSettings(ApiModel):
    """The method-specific settings the model was trained with."""

    lora: LoraSettings | None = Field(default=None, description="LoRA settings (LORA, QLORA).")
    quantization: QuantizationSettings | None = Field(
        default=None, description="Quantisation (QLORA)."
    )
    virtual_tokens: VirtualTokenSettings | None = Field(
        default=None, description="Virtual tokens (PREFIX_TUNING, PROMPT_TUNING)."
    )


class SourceJob(ApiModel):
    """The FineTuningJob that produced the model."""

    name: str = Field(description="Name of the FineTuningJob.", max_length=NAME_MAX)
    namespace: str = Field(description="Namespace of the FineTuningJob.", max_length=NAME_MAX)
    uid: str = Field(description="UID of the FineTuningJob (names can be reused).", max_length=64)
    generation: int = Field(description="Generation of its spec that was trained.")


class SourceMerge(ApiModel):
    """The ModelMerge that produced the model."""

    name: str = Field(description="Name of the ModelMerge.", max_length=NAME_MAX)
    namespace: str = Field(description="Namespace of the ModelMerge.", max_length=NAME_MAX)
    uid: str = Field(description="UID of the ModelMerge.", max_length=64)


class ParentModel(ApiModel):
    """One of the models a merged model was made from."""

    name: str = Field(description="Its RegisteredModel.", max_length=NAME_MAX)
    uid: str = Field(
        description="UID of that RegisteredModel (names can be reused).", max_length=64
    )
    digest: str = Field(description="sha256 of its weights, as merged.", max_length=128)
    weight: float = Field(description="Its weight in the merge.")
    method: FineTuningMethod = Field(description="How it was fine-tuned.")
    source_job: str | None = Field(
        default=None, description="The FineTuningJob that trained it, if any.", max_length=NAME_MAX
    )


class MergeLineage(ApiModel):
    """How a merged model was made: from which models, with which weights and method."""

    method: MergeMethod = Field(description="The merge method.")
    format: MergeFormat = Field(description="adapter (a merged adapter) or full (full weights).")
    parents: list[ParentModel] = Field(description="The models merged, in order.", max_length=8)
    density: float | None = Field(default=None, description="ties/dare: fraction kept.")
    majority_sign_method: SignMethod | None = Field(
        default=None, description="ties/dare_ties: how each parameter's sign was elected."
    )
    svd_rank: int | None = Field(default=None, description="svd: rank of the merged adapter.")
    source: SourceMerge = Field(description="The ModelMerge that made it.")


class ServingHints(ApiModel):
    """How to serve the model with common inference servers."""

    vllm: str = Field(default="", description="vLLM command line.", max_length=TEXT_MAX)
    kserve: str = Field(
        default="", description="KServe InferenceService snippet (YAML).", max_length=TEXT_MAX
    )
    transformers: str = Field(
        default="", description="Python snippet that loads the model.", max_length=TEXT_MAX
    )


class RegisteredModelSpec(ApiModel):
    """What was trained, from what, how, and where the weights are."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "has(self.sourceJob) != has(self.merge)",
                "a RegisteredModel records either the FineTuningJob that trained it (sourceJob) "
                "or the ModelMerge that made it (merge)",
            )
        )
    }

    base_model: BaseModelSource = Field(description="The model fine-tuning started from.")
    method: FineTuningMethod = Field(description="Fine-tuning method.")
    adapter: AdapterSettings = Field(
        default_factory=AdapterSettings, description="Method settings."
    )
    artifact: Artifact = Field(description="The trained weights.")
    dataset: DatasetLineage | None = Field(
        default=None, description="The training data (trained models)."
    )
    hyperparameters: ResolvedHyperparameters | None = Field(
        default=None, description="The hyperparameters used (trained models)."
    )
    seed: int | None = Field(default=None, description="Random seed (trained models).")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Final metrics (loss, eval loss, perplexity)."
    )
    evaluation: EvaluationResult | None = Field(
        default=None,
        description="The evaluation on held-out examples: each metric for the base model "
        "(before) and the fine-tuned one (after), the evaluation set's digest and the "
        "per-example report.",
    )
    source_job: SourceJob | None = Field(
        default=None, description="The FineTuningJob that trained it (trained models)."
    )
    merge: MergeLineage | None = Field(
        default=None, description="The merge that made it (merged models): parents and method."
    )
    trainer_image: str = Field(description="Image that ran the trainer.", max_length=512)
    trained_at: datetime = Field(description="When training (or the merge) completed.")
    serving: ServingHints = Field(default_factory=ServingHints, description="How to serve it.")


class RegisteredModel(ApiModel):
    """A fine-tuned model with its lineage."""

    api_version: str = Field(default="kubetune.dev/v1alpha1", description="kubetune.dev/v1alpha1")
    kind: str = Field(default=KIND, description=KIND)
    metadata: dict = Field(default_factory=dict, description="Standard object metadata.")
    spec: RegisteredModelSpec = Field(
        description="The record; written once.",
        json_schema_extra=validations(
            cel("self == oldSelf", "a RegisteredModel's record is immutable")
        ),
    )
