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

    base_model: BaseModelSource = Field(description="The model fine-tuning started from.")
    method: FineTuningMethod = Field(description="Fine-tuning method.")
    adapter: AdapterSettings = Field(
        default_factory=AdapterSettings, description="Method settings."
    )
    artifact: Artifact = Field(description="The trained weights.")
    dataset: DatasetLineage = Field(description="The training data.")
    hyperparameters: ResolvedHyperparameters = Field(description="The hyperparameters used.")
    seed: int = Field(description="Random seed.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Final metrics (loss, eval loss, perplexity)."
    )
    evaluation: EvaluationResult | None = Field(
        default=None,
        description="The evaluation on held-out examples: each metric for the base model "
        "(before) and the fine-tuned one (after), the evaluation set's digest and the "
        "per-example report.",
    )
    source_job: SourceJob = Field(description="The FineTuningJob that trained it.")
    trainer_image: str = Field(description="Image that ran the trainer.", max_length=512)
    trained_at: datetime = Field(description="When training completed.")
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
