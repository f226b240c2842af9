"""FineTuningJob: what to fine-tune, on what data, how, and where the result goes."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field, JsonValue

from kubetune.api.common import (
    CONDITIONS_LIST_MAP,
    DNS_SUBDOMAIN,
    LIST_MAX,
    MAP_MAX,
    NAME_MAX,
    TEXT_MAX,
    ApiModel,
    AutoInt,
    Condition,
    SecretKeyRef,
    VolumeLocation,
    cel,
    validations,
)
from kubetune.api.data import (  # noqa: F401  (re-exported: part of this API)
    FILE_FORMATS,
    DatasetFormat,
    FieldMapping,
    HuggingFaceDataset,
)
from kubetune.api.evaluation import EvaluationResult, EvaluationSpec

KIND = "FineTuningJob"
PLURAL = "finetuningjobs"
SHORT_NAME = "ftj"


class FineTuningMethod(StrEnum):
    """How the base model's weights are adapted."""

    FULL = "FULL"
    LORA = "LORA"
    QLORA = "QLORA"
    PREFIX_TUNING = "PREFIX_TUNING"
    PROMPT_TUNING = "PROMPT_TUNING"


class BaseModelSource(ApiModel):
    """The model to start from: a Hugging Face Hub repository at a pinned
    revision, or a model saved on a volume."""

    name: str = Field(
        description="Hub repository id (e.g. meta-llama/Llama-3.2-1B), or, with `volume`, "
        "the name recorded in the model's lineage.",
        min_length=1,
        max_length=NAME_MAX,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision to load: a commit hash (recommended) or a tag or branch. "
        "Required when loading from the Hub, so that a job is reproducible.",
        max_length=NAME_MAX,
        pattern=r"^[A-Za-z0-9._/-]+$",
    )
    volume: VolumeLocation | None = Field(
        default=None, description="Load the model from this folder instead of the Hub."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Hub access token for gated or private models."
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the model repository's own Python code to run in the trainer.",
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "has(self.volume) || has(self.revision)",
                "revision is required when the model comes from the Hub: pin a commit hash or tag",
                field_path=".revision",
            ),
        )
    }


class CustomLoader(ApiModel):
    """A dataset loader from an installed Python package of the trainer image."""

    loader: str = Field(
        description="`package.module:function`, or the name of an entry point in the "
        "`kubetune.dataset_loaders` group. Never a path to code.",
        max_length=NAME_MAX,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?$",
    )
    args: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="Keyword arguments passed to the loader: any JSON values (text, numbers, "
        "booleans, lists, objects).",
        max_length=MAP_MAX,
    )


class PreprocessingType(StrEnum):
    FILTER = "filter"
    TRANSFORM = "transform"
    AUGMENT = "augment"


class PreprocessingStep(ApiModel):
    """One step of the dataset pipeline, applied in order before training."""

    type: PreprocessingType = Field(description="filter, transform or augment.")
    condition: str | None = Field(
        default=None,
        description='For filter: rows to keep, e.g. `length > 10 and not text contains "http"`. '
        "Fields: length, word_count, token_count, and the dataset's columns.",
        max_length=TEXT_MAX,
    )
    operation: str | None = Field(
        default=None,
        description="For transform: lowercase, strip, normalize_whitespace, deduplicate, truncate or template.",
        max_length=NAME_MAX,
    )
    method: str | None = Field(
        default=None,
        description="For augment: back_translation or noise.",
        max_length=NAME_MAX,
    )
    params: dict[str, str] = Field(
        default_factory=dict, description="Settings of the operation or method.", max_length=MAP_MAX
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel("self.type != 'filter' || has(self.condition)", "a filter step needs a condition"),
            cel(
                "self.type != 'transform' || has(self.operation)",
                "a transform step needs an operation",
            ),
            cel("self.type != 'augment' || has(self.method)", "an augment step needs a method"),
            cel(
                "[has(self.condition), has(self.operation), has(self.method)].filter(x, x).size() == 1",
                "set exactly one of condition (filter), operation (transform), method (augment)",
            ),
        )
    }


class DatasetSpec(ApiModel):
    """The training data, its format, shape and preprocessing."""

    format: DatasetFormat = Field(description="JSONL, CSV, TEXT, PARQUET, HUGGINGFACE or CUSTOM.")
    volume: VolumeLocation | None = Field(
        default=None, description="File or folder holding the data (JSONL, CSV, TEXT, PARQUET)."
    )
    hugging_face: HuggingFaceDataset | None = Field(
        default=None, alias="huggingFace", description="Dataset on the Hub (HUGGINGFACE)."
    )
    custom: CustomLoader | None = Field(
        default=None, description="Loader from the trainer image (CUSTOM)."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Hub access token for a gated or private dataset."
    )
    fields: FieldMapping = Field(
        default_factory=FieldMapping,
        description="Columns holding the example; if empty, the trainer picks text, "
        "prompt/completion or messages by the columns present.",
    )
    preprocessing: list[PreprocessingStep] = Field(
        default_factory=list,
        description="Steps applied in order before training.",
        max_length=LIST_MAX,
    )
    validation_split: float = Field(
        default=0.1,
        description="Fraction of rows held out for evaluation (0 disables evaluation).",
        ge=0.0,
        le=0.5,
    )
    validate_first: bool = Field(
        default=True,
        description="Check the dataset (readable rows, fields, preprocessing, lengths) in a "
        "CPU-only pod before any GPU is requested.",
    )

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "(self.format in ['JSONL', 'CSV', 'TEXT', 'PARQUET']) == has(self.volume)",
                "volume is required for JSONL, CSV, TEXT and PARQUET datasets, and only for them",
                field_path=".volume",
            ),
            cel(
                "(self.format == 'HUGGINGFACE') == has(self.huggingFace)",
                "huggingFace is required for format HUGGINGFACE, and only for it",
                field_path=".huggingFace",
            ),
            cel(
                "(self.format == 'CUSTOM') == has(self.custom)",
                "custom is required for format CUSTOM, and only for it",
                field_path=".custom",
            ),
        )
    }


class LoraSettings(ApiModel):
    """Low-rank adapter settings (LORA and QLORA)."""

    rank: int = Field(default=8, description="Rank r of the update matrices.", gt=0, le=1024)
    alpha: int = Field(
        default=16,
        description="Scaling numerator: updates are scaled by alpha / rank.",
        gt=0,
        le=4096,
    )
    dropout: float = Field(
        default=0.05, description="Dropout on the adapter's input.", ge=0.0, lt=1.0
    )
    target_modules: list[str] = Field(
        default_factory=list,
        description="Module names to adapt (e.g. q_proj, v_proj); empty: all linear layers of the "
        "attention and MLP blocks.",
        max_length=LIST_MAX,
    )


class QuantizationType(StrEnum):
    NF4 = "nf4"
    FP4 = "fp4"


class ComputeDType(StrEnum):
    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class QuantizationSettings(ApiModel):
    """How the frozen base weights are quantised (QLORA)."""

    bits: int = Field(
        default=4,
        description="Bits per weight: 4 (or 8 for LLM.int8).",
        ge=4,
        le=8,
        json_schema_extra={"enum": [4, 8]},
    )
    quant_type: QuantizationType = Field(
        default=QuantizationType.NF4, description="nf4 or fp4 (4-bit only)."
    )
    double_quant: bool = Field(default=True, description="Quantise the quantisation constants too.")
    compute_dtype: ComputeDType = Field(
        default=ComputeDType.AUTO,
        description="Dtype of the matmuls on dequantised weights (auto: that of the training "
        "precision, so float16 on GPUs without bfloat16).",
    )


class VirtualTokenSettings(ApiModel):
    """Learned virtual tokens (PREFIX_TUNING and PROMPT_TUNING)."""

    num_virtual_tokens: int = Field(
        default=20, description="Number of virtual tokens.", gt=0, le=512
    )
    init_text: str | None = Field(
        default=None,
        description="PROMPT_TUNING only: initialise the prompt from this text's embeddings.",
        max_length=TEXT_MAX,
    )


class LRScheduler(StrEnum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class PackingStrategy(StrEnum):
    """How examples share a micro-batch when packing is on."""

    AUTO = "auto"  # the cheaper of padding_free and padded for the hardware and the lengths
    PADDING_FREE = "padding_free"  # each micro-batch flattened into one row, no padding
    BFD = "bfd"  # best-fit-decreasing packing into rows of maxSeqLength tokens
    PADDED = "padded"  # padded rows of similar length (also what packing: false means)


class AttentionImplementation(StrEnum):
    """The attention kernel (transformers' attn_implementation)."""

    AUTO = "auto"
    SDPA = "sdpa"
    # SDPA run per example on a padding-free row (the trainer's own varlen path)
    SDPA_VARLEN = "sdpa_varlen"
    EAGER = "eager"
    FLASH_ATTENTION_2 = "flash_attention_2"
    FLASH_ATTENTION_3 = "flash_attention_3"
    FLEX_ATTENTION = "flex_attention"


class DistributedStrategy(StrEnum):
    """How the training processes share the work."""

    AUTO = "auto"  # ddp for adapters on a model that fits one device, fsdp for FULL or larger
    DDP = "ddp"  # data parallel: every process holds the whole model
    FSDP = "fsdp"  # FSDP2: weights, gradients and optimizer state sharded across processes
    NONE = "none"  # resolved only: a single process


class Precision(StrEnum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Hyperparameters(ApiModel):
    """Training settings. Fields marked auto may be left out or set to "auto":
    the operator then derives them and reports the values used in
    status.hyperparameters."""

    epochs: AutoInt = Field(default="auto", description="Passes over the dataset (auto: 3).")
    max_steps: int | None = Field(
        default=None,
        description="Stop after this many optimizer steps (overrides epochs).",
        gt=0,
        le=10_000_000,
    )
    batch_size: AutoInt = Field(
        default="auto",
        description="Examples per device per step (auto: from GPU memory and sequence length).",
    )
    gradient_accumulation_steps: AutoInt = Field(
        default="auto",
        description="Steps to accumulate before an optimizer step (auto: enough for an effective "
        "batch of 16 examples).",
    )
    learning_rate: float | None = Field(
        default=None,
        description="Peak learning rate; leave out for auto (by method: 2e-5 FULL, 2e-4 LoRA/QLoRA, "
        "1e-2 prefix/prompt tuning).",
        gt=0.0,
        le=1.0,
    )
    lr_scheduler: LRScheduler = Field(
        default=LRScheduler.LINEAR, description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(
        default=0.03, description="Fraction of steps spent warming up.", ge=0.0, le=0.5
    )
    weight_decay: float = Field(default=0.0, description="AdamW weight decay.", ge=0.0, le=1.0)
    max_grad_norm: float = Field(
        default=1.0, description="Gradient clipping norm (0 disables).", ge=0.0, le=1000.0
    )
    max_seq_length: int = Field(
        default=1024, description="Longest example, in tokens.", ge=8, le=131072
    )
    packing: bool = Field(
        default=True,
        description="Let several examples share a row (attention kept within each example); "
        "false: padded rows.",
    )
    packing_strategy: PackingStrategy = Field(
        default=PackingStrategy.AUTO,
        description="padding_free (a micro-batch in one row), bfd (rows of maxSeqLength filled "
        "best-fit-decreasing; batchSize then counts rows) or padded; auto: padding_free where "
        "the attention kernel attends within each example only (flash attention, "
        "sdpa_varlen), else whichever of padding_free and padded costs fewer operations on "
        "this dataset's lengths.",
    )
    attn_implementation: AttentionImplementation = Field(
        default=AttentionImplementation.AUTO,
        description="Attention kernel; auto: flash_attention_2 where installed and supported "
        "(NVIDIA compute capability 8.0 or newer), else sdpa_varlen (SDPA per example of a "
        "padding-free row; plain sdpa otherwise); sdpa for PREFIX_TUNING and PROMPT_TUNING.",
    )
    precision: Precision = Field(
        default=Precision.AUTO, description="auto (bf16 where supported), bf16, fp16, fp32."
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in the backward pass to save memory; leave out for "
        "auto (on only when the memory estimate needs it).",
    )
    liger_kernel: bool | None = Field(
        default=None,
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU); leave out for auto "
        "(on for NVIDIA GPUs where the liger-kernel package is installed).",
    )
    eval_steps: int | None = Field(
        default=None,
        description="Evaluate every N steps (default: once per epoch).",
        gt=0,
        le=10_000_000,
    )
    save_steps: int = Field(
        default=500, description="Save a checkpoint every N steps.", gt=0, le=10_000_000
    )
    logging_steps: int = Field(
        default=10, description="Report progress every N steps.", gt=0, le=100_000
    )


class OutputSpec(ApiModel):
    """Where checkpoints and the trained model are written."""

    volume: VolumeLocation = Field(
        description="Folder for checkpoints and the final model; each job writes in its own "
        "sub-folder <job name>-<first part of its uid>."
    )
    merge_adapter: bool = Field(
        default=False,
        description="LORA/QLORA: also save the base model with the adapter merged in "
        "(QLORA merges into a 16-bit copy of the base).",
    )

    def job_location(self, job_name: str, job_uid: str, path: str = "") -> VolumeLocation:
        """`path` inside the job's own folder of the output volume: another job (another
        name, or the same name created again) never reads its checkpoints nor overwrites
        its weights."""
        folder = f"{job_name}-{job_uid.split('-')[0]}"
        parts = (self.volume.path.strip("/"), folder, path.strip("/"))
        return VolumeLocation(
            claim_name=self.volume.claim_name, path="/".join(p for p in parts if p)
        )


class Toleration(ApiModel):
    """A toleration, as in a pod spec."""

    key: str | None = Field(
        default=None, description="Taint key; empty with Exists matches all.", max_length=NAME_MAX
    )
    operator: str | None = Field(
        default=None,
        description="Exists or Equal.",
        json_schema_extra={"enum": ["Exists", "Equal"]},
    )
    value: str | None = Field(
        default=None, description="Taint value for Equal.", max_length=NAME_MAX
    )
    effect: str | None = Field(
        default=None,
        description="NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
        json_schema_extra={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long to stay bound."
    )


QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


class ResourceSpec(ApiModel):
    """Compute for the training pod and where it may run."""

    gpus: int = Field(
        default=1, description="NVIDIA GPUs (nvidia.com/gpu) per training pod.", ge=0, le=64
    )
    nodes: int = Field(
        default=1,
        description="Training pods, each on its own node with `gpus` GPUs; more than one trains "
        "with torchrun across them.",
        ge=1,
        le=256,
    )
    gpu_type: str | None = Field(
        default=None,
        description="GPU product, matched against the node label nvidia.com/gpu.product "
        "(e.g. NVIDIA-A100-SXM4-80GB).",
        max_length=NAME_MAX,
    )
    cpu: str = Field(
        default="4",
        description="CPU request (a Kubernetes quantity).",
        max_length=64,
        pattern=QUANTITY,
    )
    memory: str = Field(
        default="32Gi", description="Memory request and limit.", max_length=64, pattern=QUANTITY
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pod requires.", max_length=MAP_MAX
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Extra tolerations; the nvidia.com/gpu taint is tolerated whenever gpus > 0.",
        max_length=LIST_MAX,
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="Pod affinity rules, as in a pod spec (core/v1 Affinity)."
    )
    priority_class_name: str | None = Field(
        default=None,
        description="PriorityClass of the training pod.",
        max_length=NAME_MAX,
        pattern=DNS_SUBDOMAIN,
    )


class DistributedSpec(ApiModel):
    """How the training processes of a job work together."""

    strategy: DistributedStrategy = Field(
        default=DistributedStrategy.AUTO,
        description="auto, ddp or fsdp (FSDP2). auto: ddp for LORA, QLORA, PREFIX_TUNING and "
        "PROMPT_TUNING when the model fits one device, fsdp for FULL and for models that do not.",
        json_schema_extra={"enum": ["auto", "ddp", "fsdp"]},
    )
    processes_per_node: int | None = Field(
        default=None,
        description="Training processes per pod for CPU-only jobs (resources.gpus: 0; default 1). "
        "With GPUs each pod runs one process per GPU.",
        ge=1,
        le=64,
    )
    timeout_seconds: int = Field(
        default=600,
        description="How long a collective operation may wait for the other processes before "
        "the attempt fails (a crashed process never leaves the others hanging).",
        ge=30,
        le=86_400,
    )


class RegistrationSpec(ApiModel):
    """The RegisteredModel created when training succeeds."""

    enabled: bool = Field(default=True, description="Create a RegisteredModel on success.")
    model_name: str | None = Field(
        default=None,
        description="Name of the RegisteredModel (default: the job's name).",
        max_length=NAME_MAX,
        pattern=DNS_SUBDOMAIN,
    )
    suffix: str | None = Field(
        default=None,
        description="Appended to the model name, like the OpenAI API's suffix.",
        max_length=40,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    )


class PodMetadata(ApiModel):
    """Labels and annotations added to the training pod."""

    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra pod labels.", max_length=MAP_MAX
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra pod annotations.", max_length=MAP_MAX
    )


_METHOD_SETTINGS_RULES = validations(
    cel(
        "self.method != 'PREFIX_TUNING' || !has(self.hyperparameters) "
        "|| !has(self.hyperparameters.gradientCheckpointing) "
        "|| !self.hyperparameters.gradientCheckpointing",
        "PREFIX_TUNING cannot use gradient checkpointing (its prefix lives in the attention "
        "cache, which checkpointing drops): leave hyperparameters.gradientCheckpointing out",
        field_path=".hyperparameters.gradientCheckpointing",
    ),
    cel(
        "!has(self.distributed) || self.distributed.strategy != 'fsdp' "
        "|| self.method in ['FULL', 'LORA']",
        "distributed.strategy fsdp supports FULL and LORA only (QLORA's 4-bit weights and the "
        "virtual tokens of PREFIX_TUNING/PROMPT_TUNING do not shard): use ddp or auto",
        field_path=".distributed.strategy",
    ),
    cel(
        "!has(self.distributed) || !has(self.distributed.processesPerNode) "
        "|| !has(self.resources) || self.resources.gpus == 0",
        "distributed.processesPerNode applies to CPU-only jobs (resources.gpus: 0); with GPUs "
        "each pod runs one process per GPU",
        field_path=".distributed.processesPerNode",
    ),
    cel(
        "!has(self.lora) || self.method in ['LORA', 'QLORA']",
        "lora settings apply only to method LORA or QLORA",
        field_path=".lora",
    ),
    cel(
        "!has(self.quantization) || self.method == 'QLORA'",
        "quantization applies only to method QLORA",
        field_path=".quantization",
    ),
    cel(
        "!has(self.prefixTuning) || self.method == 'PREFIX_TUNING'",
        "prefixTuning applies only to method PREFIX_TUNING",
        field_path=".prefixTuning",
    ),
    cel(
        "!has(self.promptTuning) || self.method == 'PROMPT_TUNING'",
        "promptTuning applies only to method PROMPT_TUNING",
        field_path=".promptTuning",
    ),
    cel(
        "!has(self.output) || !self.output.mergeAdapter || self.method in ['LORA', 'QLORA']",
        "output.mergeAdapter applies only to LORA and QLORA (prefix and prompt adapters cannot be merged)",
        field_path=".output.mergeAdapter",
    ),
    cel(
        "!has(self.evaluation) || has(self.evaluation.data) "
        "|| !has(self.dataset.validationSplit) || self.dataset.validationSplit > 0.0",
        "evaluation needs held-out examples: set evaluation.data, or a dataset.validationSplit "
        "above 0 (evaluation then uses the validation split)",
        field_path=".evaluation",
    ),
)


class FineTuningJobSpec(ApiModel):
    """A fine-tuning run: base model, dataset, method, hyperparameters and where the result goes."""

    base_model: BaseModelSource = Field(description="The model to start from.")
    dataset: DatasetSpec = Field(description="The training data.")
    method: FineTuningMethod = Field(
        description="FULL, LORA, QLORA, PREFIX_TUNING or PROMPT_TUNING."
    )
    lora: LoraSettings | None = Field(default=None, description="LORA/QLORA adapter settings.")
    quantization: QuantizationSettings | None = Field(
        default=None, description="QLORA base-model quantisation."
    )
    prefix_tuning: VirtualTokenSettings | None = Field(
        default=None, description="PREFIX_TUNING settings."
    )
    prompt_tuning: VirtualTokenSettings | None = Field(
        default=None, description="PROMPT_TUNING settings."
    )
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Training settings."
    )
    output: OutputSpec = Field(description="Where checkpoints and the trained model are written.")
    evaluation: EvaluationSpec | None = Field(
        default=None,
        description="Evaluate the trained model (and the base model) on held-out examples after "
        "training: loss, token accuracy and generation metrics.",
    )
    resources: ResourceSpec = Field(
        default_factory=ResourceSpec, description="Compute and placement."
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec,
        description="Multi-process training: strategy and processes per pod.",
    )
    image: str | None = Field(
        default=None,
        description="Trainer image (default: the operator's).",
        max_length=512,
        min_length=1,
    )
    seed: int = Field(
        default=42,
        description="Random seed: the same seed and inputs repeat a run.",
        ge=0,
        le=2**32 - 1,
    )
    suspend: bool = Field(
        default=False,
        description="Suspend the job: its pods are stopped (a checkpoint is saved) and it resumes "
        "from the latest checkpoint when set back to false.",
    )
    cancel: bool = Field(
        default=False,
        description="Stop the job for good: its pods are stopped and it ends as Cancelled; the "
        "FineTuningJob stays as a record. Cannot be undone.",
        json_schema_extra=validations(
            cel(
                "oldSelf == false || self == true",
                "a cancelled job cannot be resumed: create a new one",
            )
        ),
    )
    active_deadline_seconds: int | None = Field(
        default=None, description="Fail the job if it runs longer than this.", gt=0, le=31_536_000
    )
    max_retries: int = Field(
        default=3,
        description="Retries after trainer failures (preemptions and bad input are not retried "
        "and not counted).",
        ge=0,
        le=100,
    )
    registration: RegistrationSpec = Field(
        default_factory=RegistrationSpec, description="The RegisteredModel created on success."
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Extra pod labels and annotations."
    )

    model_config = ApiModel.model_config | {"json_schema_extra": _METHOD_SETTINGS_RULES}


class Phase(StrEnum):
    """A one-word summary of the job's conditions, for display."""

    PENDING = "Pending"  # accepted, nothing started yet
    VALIDATING = "Validating"  # checking inputs before GPUs are requested
    QUEUED = "Queued"  # waiting for a queue (Kueue) or for resources
    SUSPENDED = "Suspended"  # spec.suspend is true
    RUNNING = "Running"  # the trainer is running
    SUCCEEDED = "Succeeded"  # trained, and registered when asked
    FAILED = "Failed"  # ended without a model; see status.failure
    CANCELLED = "Cancelled"  # stopped by the user; the record is kept


class ProgressDisplay(ApiModel):
    """Progress numbers as `kubectl get` shows them."""

    loss: str = Field(default="", description="Training loss, 4 significant digits.", max_length=32)
    eval_loss: str = Field(
        default="", description="Validation loss, 4 significant digits.", max_length=32
    )
    tokens_per_second: str = Field(
        default="", description="Tokens per second, e.g. 1.23k.", max_length=32
    )


class Progress(ApiModel):
    """Training progress as last reported by the trainer."""

    step: int = Field(default=0, description="Optimizer steps done.", ge=0)
    total_steps: int = Field(default=0, description="Optimizer steps planned.", ge=0)
    steps: str = Field(default="", description="step/totalSteps, for display.", max_length=64)
    percent: int = Field(default=0, description="Percentage done.", ge=0, le=100)
    epoch: float = Field(default=0.0, description="Epochs done (fractional).", ge=0)
    loss: float | None = Field(default=None, description="Training loss (recent average).")
    eval_loss: float | None = Field(default=None, description="Loss on the validation split.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(
        default=None, description="Real (non-padding) tokens per second."
    )
    eta_seconds: int | None = Field(
        default=None, description="Estimated seconds to completion.", ge=0
    )
    eta: str = Field(
        default="", description="Estimated time to completion, for display.", max_length=64
    )
    display: ProgressDisplay = Field(
        default_factory=ProgressDisplay,
        description="The numbers above rounded for `kubectl get` (the full values stay above).",
    )
    updated_at: datetime | None = Field(default=None, description="When the trainer reported this.")


class ResolvedHyperparameters(ApiModel):
    """The hyperparameters actually used, every auto resolved."""

    epochs: int = Field(description="Passes over the dataset.")
    max_steps: int | None = Field(default=None, description="Step limit, if any.")
    batch_size: int = Field(description="Examples (rows, with bfd packing) per process per step.")
    gradient_accumulation_steps: int = Field(description="Steps accumulated per optimizer step.")
    effective_batch_size: int = Field(
        description="batchSize x gradientAccumulationSteps x worldSize."
    )
    world_size: int = Field(default=1, description="Training processes, over all pods.", ge=1)
    distributed_strategy: DistributedStrategy = Field(
        default=DistributedStrategy.NONE, description="none (one process), ddp or fsdp."
    )
    learning_rate: float = Field(description="Peak learning rate.")
    lr_scheduler: LRScheduler = Field(description="Learning-rate schedule.")
    warmup_ratio: float = Field(description="Fraction of steps spent warming up.")
    weight_decay: float = Field(description="AdamW weight decay.")
    max_grad_norm: float = Field(description="Gradient clipping norm.")
    max_seq_length: int = Field(description="Longest example, in tokens.")
    packing: bool = Field(description="Whether examples share rows.")
    packing_strategy: PackingStrategy = Field(
        default=PackingStrategy.AUTO,
        description="padding_free, bfd or padded; auto until the trainer has seen the lengths.",
    )
    attn_implementation: AttentionImplementation = Field(
        default=AttentionImplementation.AUTO,
        description="Attention kernel; auto until the trainer has seen the hardware.",
    )
    liger_kernel: bool = Field(default=False, description="Whether Liger's kernels are used.")
    precision: Precision = Field(description="Numeric precision used.")
    gradient_checkpointing: bool = Field(description="Whether activations are recomputed.")
    eval_steps: int | None = Field(
        default=None, description="Evaluation interval in steps (unset: per epoch)."
    )
    save_steps: int = Field(description="Checkpoint interval in steps.")
    logging_steps: int = Field(description="Progress interval in steps.")
    seed: int = Field(description="Random seed.")
    estimated_memory_gib: float | None = Field(
        default=None, description="Estimated peak memory per device for this setup, in GiB."
    )
    decisions: list[str] = Field(
        default_factory=list,
        description="Why each auto setting got its value.",
        max_length=LIST_MAX,
    )


class FailureReason(StrEnum):
    """Why a job failed, classified from what the cluster and the trainer reported."""

    INVALID_SPEC = "InvalidSpec"
    INVALID_DATASET = "InvalidDataset"
    INPUT_NOT_FOUND = "InputNotFound"
    OOM_KILLED = "OOMKilled"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    PREEMPTED = "Preempted"
    TRAINER_ERROR = "TrainerError"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    REGISTRATION_FAILED = "RegistrationFailed"


class Failure(ApiModel):
    """Why the job failed."""

    reason: FailureReason = Field(description="Failure class.")
    message: str = Field(description="What happened and how to fix it.", max_length=TEXT_MAX)
    exit_code: int | None = Field(
        default=None, description="The trainer's exit code, if it exited."
    )


class ArtifactStatus(ApiModel):
    """What the trainer wrote."""

    volume: VolumeLocation = Field(description="Folder holding the trained model.")
    kind: str = Field(description="adapter, full or merged.", max_length=32)
    digest: str = Field(default="", description="sha256 over the weight files.", max_length=128)


class FineTuningJobStatus(ApiModel):
    """Observed state, written by the operator only."""

    phase: Phase = Field(default=Phase.PENDING, description="Display summary of the conditions.")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Detailed state.",
        max_length=16,
        json_schema_extra=CONDITIONS_LIST_MAP,
    )
    job_name: str | None = Field(default=None, description="The batch/v1 Job running the trainer.")
    start_time: datetime | None = Field(default=None, description="When training started.")
    completion_time: datetime | None = Field(default=None, description="When the job ended.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    hyperparameters: ResolvedHyperparameters | None = Field(
        default=None,
        description="The hyperparameters actually used (as the trainer reported them once it "
        "started, else as the operator resolved them).",
    )
    world_size: int | None = Field(
        default=None, description="Training processes over all pods (nodes x processes per pod)."
    )
    failure: Failure | None = Field(default=None, description="Why the job failed.")
    retries: int = Field(
        default=0, description="Trainer failures so far (not counting preemptions)."
    )
    preemptions: int = Field(default=0, description="Times the trainer was preempted or evicted.")
    queue_preemptions: int = Field(
        default=0,
        description="Of those, the times the queue (Kueue) preempted the job's workload, as "
        "its eviction statistics count them.",
    )
    counted_disruptions: list[str] = Field(
        default_factory=list,
        description="UIDs of the disrupted pods already counted in preemptions (of those that "
        "still exist): the count is a running total, not the pods disrupted at one time.",
    )
    restarts: int = Field(
        default=0,
        description="Times all pods of a multi-pod job were started again together after one "
        "of them failed or was disrupted.",
    )
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Final metrics from the trainer; with spec.evaluation also eval_<metric> and "
        "base_eval_<metric>.",
    )
    evaluation: EvaluationResult | None = Field(
        default=None, description="What spec.evaluation measured, tuned and base model."
    )
    artifact: ArtifactStatus | None = Field(default=None, description="The trained model's files.")
    dataset_digest: str | None = Field(default=None, description="sha256 of the prepared dataset.")
    registered_model: str | None = Field(default=None, description="Name of the RegisteredModel.")
    trainer_image: str | None = Field(default=None, description="Image that ran the trainer.")


class FineTuningJob(ApiModel):
    """A fine-tuning run of a language model."""

    api_version: str = Field(default="kubetune.dev/v1alpha1", description="kubetune.dev/v1alpha1")
    kind: str = Field(default=KIND, description=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: FineTuningJobSpec = Field(description="What to train and how.")
    status: FineTuningJobStatus | None = Field(default=None, description="Observed state.")
