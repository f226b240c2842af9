"""The SDK's job description (`FineTuningConfig`) and how it maps onto a FineTuningJob.

Mapping from `FineTuningConfig` to `FineTuningJob.spec`:

| config                              | FineTuningJob spec                                        |
|-------------------------------------|-----------------------------------------------------------|
| model_id                            | baseModel.name (+ baseModel.volume for a local folder or  |
|                                     | additional_params["model_volume"]; revision defaults to   |
|                                     | additional_params["revision"] or "main")                  |
| method                              | method (upper case); LORA + use_4bit -> QLORA 4-bit,      |
|                                     | LORA + use_8bit -> QLORA 8-bit; QLORA -> 4-bit by default |
| dataset_path, dataset_format        | dataset.format, dataset.volume (files), huggingFace.name  |
|                                     | (HUGGINGFACE), custom.loader (CUSTOM)                     |
| output_dir                          | output.volume, one sub-folder per job (`<output>/<job>`)  |
| epochs, batch_size, learning_rate,  | hyperparameters.epochs, batchSize, learningRate,          |
| max_steps, eval_steps, save_steps,  | maxSteps, evalSteps, saveSteps,                           |
| gradient_accumulation_steps,        | gradientAccumulationSteps,                                |
| max_seq_length                      | maxSeqLength                                              |
| warmup_steps                        | hyperparameters.warmupRatio = warmup_steps / planned steps|
|                                     | (max_steps, or epochs x steps per epoch estimated from the|
|                                     | dataset file's rows), at most 0.5; 0 -> 0.0               |
| lora_rank, lora_alpha, lora_dropout | lora.rank, lora.alpha, lora.dropout (LORA, QLORA)         |
| validation_split                    | dataset.validationSplit (0 to 0.5)                        |
| seed                                | seed                                                      |
| additional_params                   | see ADDITIONAL_PARAMS                                     |

On the cluster, paths name PersistentVolumeClaims: `pvc://CLAIM/PATH`.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune.api import FineTuningJob
from kubetune.api import finetuningjob as api

PVC_SCHEME = "pvc://"


class FineTuningMethod(StrEnum):
    """How the base model's weights are adapted."""

    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"
    PREFIX_TUNING = "prefix_tuning"
    PROMPT_TUNING = "prompt_tuning"

    def to_api(self) -> api.FineTuningMethod:
        return api.FineTuningMethod(self.value.upper())


class DatasetFormat(StrEnum):
    """How the dataset is stored."""

    JSONL = "jsonl"
    CSV = "csv"
    TEXT = "text"
    HUGGINGFACE = "huggingface"
    CUSTOM = "custom"

    def to_api(self) -> api.DatasetFormat:
        return api.DatasetFormat(self.value.upper())

    @property
    def is_file(self) -> bool:
        return self in (DatasetFormat.JSONL, DatasetFormat.CSV, DatasetFormat.TEXT)

    @property
    def extension(self) -> str:
        return {"jsonl": "jsonl", "csv": "csv", "text": "txt"}.get(self.value, self.value)


# additional_params keys and what they set.
ADDITIONAL_PARAMS: dict[str, str] = {
    "revision": "baseModel.revision (Hub models; default 'main')",
    "model_volume": "baseModel.volume, as pvc://CLAIM/PATH (cluster) or a folder (local)",
    "trust_remote_code": "baseModel.trustRemoteCode",
    "fields": "dataset.fields: {text | prompt, completion | messages: column}",
    "preprocessing": "dataset.preprocessing: list of steps ({type, condition|operation|method, params})",
    "validate_first": "dataset.validateFirst",
    "dataset_config": "dataset.huggingFace.config (HUGGINGFACE)",
    "dataset_split": "dataset.huggingFace.split (HUGGINGFACE)",
    "dataset_revision": "dataset.huggingFace.revision (HUGGINGFACE)",
    "loader_args": "dataset.custom.args (CUSTOM)",
    "target_modules": "lora.targetModules",
    "num_virtual_tokens": "prefixTuning/promptTuning.numVirtualTokens",
    "warmup_ratio": "hyperparameters.warmupRatio (instead of warmup_steps)",
    "lr_scheduler": "hyperparameters.lrScheduler",
    "weight_decay": "hyperparameters.weightDecay",
    "max_grad_norm": "hyperparameters.maxGradNorm",
    "packing": "hyperparameters.packing",
    "precision": "hyperparameters.precision",
    "gradient_checkpointing": "hyperparameters.gradientCheckpointing (default auto)",
    "packing_strategy": "hyperparameters.packingStrategy: auto, padding_free, bfd or padded",
    "attn_implementation": "hyperparameters.attnImplementation",
    "liger_kernel": "hyperparameters.ligerKernel (default auto)",
    "nodes": "resources.nodes (pods, each with `gpus` GPUs)",
    "distributed_strategy": "distributed.strategy: auto, ddp or fsdp",
    "processes_per_node": "distributed.processesPerNode (CPU-only jobs)",
    "logging_steps": "hyperparameters.loggingSteps",
    "merge_adapter": "output.mergeAdapter",
    "gpus": "resources.gpus",
    "gpu_type": "resources.gpuType",
    "cpu": "resources.cpu",
    "memory": "resources.memory",
    "node_selector": "resources.nodeSelector",
    "image": "image",
    "max_retries": "maxRetries",
    "active_deadline_seconds": "activeDeadlineSeconds",
    "registered_model_name": "registration.modelName",
    "registration_suffix": "registration.suffix",
    "labels": "metadata.labels of the FineTuningJob (e.g. a Kueue queue)",
    "pod_labels": "podMetadata.labels",
    "pod_annotations": "podMetadata.annotations",
}


def _enum(kind: type[Enum], value: Any, what: str) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in kind)  # type: ignore[attr-defined]
        raise ValueError(f"{what} must be one of {choices}, not {value!r}") from None


def _positive_int(name: str, value: Any, *, optional: bool = False, zero: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else 'positive'}, not {value}")


@dataclass
class FineTuningConfig:
    """What to fine-tune, on what data, how, and where the result goes."""

    model_id: str
    method: FineTuningMethod
    dataset_path: str
    dataset_format: DatasetFormat
    output_dir: str
    epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    max_steps: int | None = None
    eval_steps: int | None = None
    save_steps: int = 500
    gradient_accumulation_steps: int = 1
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    use_8bit: bool = False
    use_4bit: bool = False
    max_seq_length: int = 512
    validation_split: float = 0.1
    seed: int = 42
    additional_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ValueError("model_id must be a non-empty string")
        self.method = _enum(FineTuningMethod, self.method, "method")
        self.dataset_format = _enum(DatasetFormat, self.dataset_format, "dataset_format")
        self.dataset_path = str(self.dataset_path)
        self.output_dir = str(self.output_dir)
        if not self.dataset_path:
            raise ValueError("dataset_path must not be empty")
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")
        for name in ("epochs", "batch_size", "save_steps", "gradient_accumulation_steps"):
            _positive_int(name, getattr(self, name))
        for name in ("lora_rank", "lora_alpha"):
            _positive_int(name, getattr(self, name))
        _positive_int("max_steps", self.max_steps, optional=True)
        _positive_int("eval_steps", self.eval_steps, optional=True)
        _positive_int("warmup_steps", self.warmup_steps, zero=True)
        _positive_int("seed", self.seed, zero=True)
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, int | float):
            raise ValueError(f"learning_rate must be a number, not {self.learning_rate!r}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], not {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if not 0 <= self.validation_split <= 0.5:
            raise ValueError(f"validation_split must be in [0, 0.5], not {self.validation_split}")
        _positive_int("max_seq_length", self.max_seq_length)
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length must be at least 8, not {self.max_seq_length}")
        if self.use_4bit and self.use_8bit:
            raise ValueError("use_4bit and use_8bit exclude each other")
        if (self.use_4bit or self.use_8bit) and self.method not in (
            FineTuningMethod.LORA,
            FineTuningMethod.QLORA,
        ):
            raise ValueError(
                f"use_4bit/use_8bit quantise the frozen base for LoRA; method {self.method.value} "
                "trains the weights themselves"
            )
        if not isinstance(self.additional_params, dict):
            raise ValueError("additional_params must be a dict")
        unknown = sorted(set(self.additional_params) - set(ADDITIONAL_PARAMS))
        if unknown:
            raise ValueError(
                f"unknown additional_params {', '.join(unknown)}; known: "
                f"{', '.join(sorted(ADDITIONAL_PARAMS))}"
            )
        if self.dataset_format.is_file and not is_pvc(self.dataset_path):
            path = Path(self.dataset_path).expanduser()
            if not path.exists():
                raise ValueError(f"dataset file {self.dataset_path} does not exist")

    @property
    def api_method(self) -> api.FineTuningMethod:
        """The method the job trains with (LoRA on a quantised base is QLoRA)."""
        if self.method == FineTuningMethod.LORA and (self.use_4bit or self.use_8bit):
            return api.FineTuningMethod.QLORA
        return self.method.to_api()


def is_pvc(path: str) -> bool:
    return str(path).startswith(PVC_SCHEME)


def parse_pvc(uri: str, what: str) -> api.VolumeLocation:
    """`pvc://CLAIM/PATH` as a VolumeLocation."""
    if not is_pvc(uri):
        raise ValueError(
            f"{what} {uri!r} must name a volume on the cluster: pvc://CLAIM/PATH "
            "(a PersistentVolumeClaim in the job's namespace)"
        )
    claim, _, path = uri[len(PVC_SCHEME) :].partition("/")
    try:
        return api.VolumeLocation(claim_name=claim, path=path.strip("/"))
    except ValidationError as err:
        raise ValueError(f"{what} {uri!r}: {_errors(err)}") from None


# --- names ------------------------------------------------------------------------------

_NAME_MAX = 45  # child objects add suffixes such as -validate and must stay within 63


def slug(text: str, max_length: int = 20) -> str:
    """A DNS-label-safe form of a model id (`org/Model_v1.5` -> `org-model-v1-5`)."""
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return text[:max_length].strip("-") or "model"


def new_job_id(model_id: str, now: datetime | None = None) -> str:
    """`ft-<model>-<yymmddhhmmss>-<random>`: a DNS label, unique even within a second."""
    stamp = (now or datetime.now(UTC)).strftime("%y%m%d%H%M%S")
    job_id = f"ft-{slug(model_id)}-{stamp}-{secrets.token_hex(3)}"
    assert len(job_id) <= _NAME_MAX
    return job_id


# --- mapping ----------------------------------------------------------------------------


def _errors(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in err.errors()
    )


def count_rows(path: Path, fmt: DatasetFormat) -> int | None:
    """Rows in a dataset file (a cheap estimate: lines, blocks or CSV records)."""
    try:
        if path.is_dir():
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if fmt == DatasetFormat.JSONL:
        return sum(1 for line in text.splitlines() if line.strip())
    if fmt == DatasetFormat.CSV:
        import csv
        import io

        return max(0, sum(1 for _ in csv.reader(io.StringIO(text))) - 1)
    if fmt == DatasetFormat.TEXT:
        if "\n\n" in text.strip():
            return sum(1 for block in text.split("\n\n") if block.strip())
        return sum(1 for line in text.splitlines() if line.strip())
    return None


def warmup_ratio(config: FineTuningConfig, rows: int | None) -> float:
    """warmup_steps as a fraction of the planned optimizer steps (at most 0.5)."""
    if "warmup_ratio" in config.additional_params:
        return float(config.additional_params["warmup_ratio"])
    if config.warmup_steps == 0:
        return 0.0
    if config.max_steps:
        total = config.max_steps
    elif rows:
        train_rows = rows - round(rows * config.validation_split)
        per_step = config.batch_size * config.gradient_accumulation_steps
        total = config.epochs * max(1, math.ceil(train_rows / per_step))
    else:
        raise ValueError(
            "warmup_steps needs the planned number of steps: set max_steps, or give "
            "additional_params['warmup_ratio'] instead"
        )
    return min(0.5, config.warmup_steps / total)


@dataclass
class Locations:
    """Where the job's inputs and output are: volumes in the spec, and for local runs the
    folder each claim stands for."""

    dataset: api.VolumeLocation | None
    output: api.VolumeLocation
    model: api.VolumeLocation | None
    local_volumes: dict[str, Path] = field(default_factory=dict)


LOCAL_DATASET_CLAIM = "dataset"
LOCAL_OUTPUT_CLAIM = "output"
LOCAL_MODEL_CLAIM = "base-model"


def cluster_locations(config: FineTuningConfig, job_id: str) -> Locations:
    dataset = None
    if config.dataset_format.is_file:
        dataset = parse_pvc(config.dataset_path, "dataset_path")
    output = parse_pvc(config.output_dir, "output_dir")
    output = output.model_copy(update={"path": "/".join(p for p in (output.path, job_id) if p)})
    model = None
    if "model_volume" in config.additional_params:
        model = parse_pvc(str(config.additional_params["model_volume"]), "model_volume")
    return Locations(dataset=dataset, output=output, model=model)


def local_locations(config: FineTuningConfig, job_id: str) -> Locations:
    volumes: dict[str, Path] = {}
    for value, what in ((config.dataset_path, "dataset_path"), (config.output_dir, "output_dir")):
        if is_pvc(value):
            raise ValueError(f"{what} {value!r} is a cluster volume: use the cluster backend")
    dataset = None
    if config.dataset_format.is_file:
        path = Path(config.dataset_path).expanduser().resolve()
        volumes[LOCAL_DATASET_CLAIM] = path.parent
        dataset = api.VolumeLocation(claim_name=LOCAL_DATASET_CLAIM, path=path.name)
    volumes[LOCAL_OUTPUT_CLAIM] = Path(config.output_dir).expanduser().resolve()
    output = api.VolumeLocation(claim_name=LOCAL_OUTPUT_CLAIM, path=job_id)
    model = None
    model_folder = config.additional_params.get("model_volume")
    if model_folder is None and Path(config.model_id).expanduser().is_dir():
        model_folder = config.model_id
    if model_folder is not None:
        if is_pvc(str(model_folder)):
            raise ValueError("model_volume is a cluster volume: use the cluster backend")
        folder = Path(model_folder).expanduser().resolve()
        if not folder.is_dir():
            raise ValueError(f"model folder {model_folder} does not exist")
        volumes[LOCAL_MODEL_CLAIM] = folder
        model = api.VolumeLocation(claim_name=LOCAL_MODEL_CLAIM)
    return Locations(dataset=dataset, output=output, model=model, local_volumes=volumes)


def base_model_name(config: FineTuningConfig) -> str:
    """The name recorded for the base model: the Hub id, or a local folder's name."""
    name = config.model_id
    if Path(name).expanduser().is_dir() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        name = Path(name).expanduser().resolve().name
    name = re.sub(r"[^A-Za-z0-9._/-]+", "-", name).lstrip("._/-")
    return name or "model"


def to_job(
    config: FineTuningConfig,
    job_id: str,
    locations: Locations,
    *,
    namespace: str | None = None,
) -> FineTuningJob:
    """The FineTuningJob for a config (see the module's mapping table)."""
    extra = config.additional_params
    method = config.api_method
    base: dict[str, Any] = {"name": base_model_name(config)}
    if locations.model is not None:
        base["volume"] = locations.model
    else:
        base["revision"] = str(extra.get("revision", "main"))
    if "revision" in extra:
        base["revision"] = str(extra["revision"])
    if "trust_remote_code" in extra:
        base["trust_remote_code"] = bool(extra["trust_remote_code"])

    fmt = config.dataset_format
    dataset: dict[str, Any] = {
        "format": fmt.to_api(),
        "validation_split": config.validation_split,
        "fields": extra.get("fields") or {},
        "preprocessing": extra.get("preprocessing") or [],
    }
    if "validate_first" in extra:
        dataset["validate_first"] = bool(extra["validate_first"])
    if fmt.is_file:
        dataset["volume"] = locations.dataset
    elif fmt == DatasetFormat.HUGGINGFACE:
        hub: dict[str, Any] = {"name": config.dataset_path}
        for key, target in (
            ("dataset_config", "config"),
            ("dataset_split", "split"),
            ("dataset_revision", "revision"),
        ):
            if key in extra:
                hub[target] = str(extra[key])
        dataset["hugging_face"] = hub
    else:
        dataset["custom"] = {"loader": config.dataset_path, "args": extra.get("loader_args") or {}}

    rows = None
    if fmt.is_file and not is_pvc(config.dataset_path):
        rows = count_rows(Path(config.dataset_path).expanduser(), fmt)
    hyperparameters: dict[str, Any] = {
        "epochs": config.epochs,
        "max_steps": config.max_steps,
        "batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "warmup_ratio": warmup_ratio(config, rows),
        "max_seq_length": config.max_seq_length,
        "eval_steps": config.eval_steps,
        "save_steps": config.save_steps,
    }
    for key in (
        "lr_scheduler",
        "weight_decay",
        "max_grad_norm",
        "packing",
        "packing_strategy",
        "attn_implementation",
        "liger_kernel",
        "precision",
        "gradient_checkpointing",
        "logging_steps",
    ):
        if key in extra:
            hyperparameters[key] = extra[key]

    spec: dict[str, Any] = {
        "base_model": base,
        "dataset": dataset,
        "method": method,
        "hyperparameters": hyperparameters,
        "output": {"volume": locations.output},
        "seed": config.seed,
    }
    if method in (api.FineTuningMethod.LORA, api.FineTuningMethod.QLORA):
        spec["lora"] = {
            "rank": config.lora_rank,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "target_modules": list(extra.get("target_modules") or []),
        }
    if method == api.FineTuningMethod.QLORA:
        spec["quantization"] = {"bits": 8 if config.use_8bit else 4}
    if method in (api.FineTuningMethod.PREFIX_TUNING, api.FineTuningMethod.PROMPT_TUNING):
        key = "prefix_tuning" if method == api.FineTuningMethod.PREFIX_TUNING else "prompt_tuning"
        spec[key] = {"num_virtual_tokens": int(extra.get("num_virtual_tokens", 20))}
    if "merge_adapter" in extra:
        spec["output"]["merge_adapter"] = bool(extra["merge_adapter"])
    resources = {
        target: extra[key]
        for key, target in (
            ("gpus", "gpus"),
            ("gpu_type", "gpu_type"),
            ("cpu", "cpu"),
            ("memory", "memory"),
            ("node_selector", "node_selector"),
            ("nodes", "nodes"),
        )
        if key in extra
    }
    if resources:
        spec["resources"] = resources
    distributed = {
        target: extra[key]
        for key, target in (
            ("distributed_strategy", "strategy"),
            ("processes_per_node", "processes_per_node"),
        )
        if key in extra
    }
    if distributed:
        spec["distributed"] = distributed
    for key, target in (
        ("image", "image"),
        ("max_retries", "max_retries"),
        ("active_deadline_seconds", "active_deadline_seconds"),
    ):
        if key in extra:
            spec[target] = extra[key]
    registration = {
        target: extra[key]
        for key, target in (
            ("registered_model_name", "model_name"),
            ("registration_suffix", "suffix"),
        )
        if key in extra
    }
    if registration:
        spec["registration"] = registration
    pod_metadata = {
        target: dict(extra[key])
        for key, target in (("pod_labels", "labels"), ("pod_annotations", "annotations"))
        if key in extra
    }
    if pod_metadata:
        spec["pod_metadata"] = pod_metadata

    metadata: dict[str, Any] = {
        "name": job_id,
        "labels": {
            "app.kubernetes.io/created-by": "kubetune-sdk",
            **{str(k): str(v) for k, v in (extra.get("labels") or {}).items()},
        },
        "annotations": {"kubetune.dev/sdk-model-id": config.model_id},
    }
    if namespace:
        metadata["namespace"] = namespace
    try:
        return FineTuningJob.model_validate({"metadata": metadata, "spec": spec})
    except ValidationError as err:
        raise ValueError(
            f"the config does not make a valid FineTuningJob: {_errors(err)}"
        ) from None
