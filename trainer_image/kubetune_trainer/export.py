"""The trained model on the output volume: weights, tokenizer, model card, merged copy."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import yaml

from kubetune.api.evaluation import EvaluationResult, shown
from kubetune.api.finetuningjob import FineTuningMethod, ResolvedHyperparameters
from kubetune.api.trainer import TrainerConfig

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def weights_digest(folder: Path) -> str:
    """sha256:<hex> over the weight files of a folder (names and contents, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise RuntimeError(f"no weight files in {folder}")
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def artifact_kind(method: FineTuningMethod) -> str:
    return "full" if method == FineTuningMethod.FULL else "adapter"


def save_model(model, tokenizer, folder: Path, *, state_dict=None) -> None:
    """Adapter (peft) or full weights as safetensors, with the tokenizer, written atomically."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(partial, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def save_trained(trainer, tokenizer, folder: Path, processes) -> None:
    """The trained weights (adapter, or the whole model for FULL) from the main process.
    Under FSDP every process takes part in gathering the full state dict first."""
    accelerator = trainer.accelerator
    state_dict = full_state_dict(trainer.model, processes) if trainer.is_fsdp_enabled else None
    if processes.is_main:
        model = accelerator.unwrap_model(trainer.model)
        save_model(model, tokenizer, folder, state_dict=state_dict)
    accelerator.wait_for_everyone()


def full_state_dict(model, processes) -> dict | None:
    """The whole model's weights on the main process, gathered shard by shard.

    Written out rather than accelerate's get_state_dict: on CPUs its gathered tensors
    still share storage that FSDP2 frees when it re-shards, so saving them fails. Each
    parameter is gathered into a fresh tensor (a collective every process joins, in
    the same order) and only the main process keeps a copy."""
    from torch.distributed.tensor import DTensor

    gathered = {}
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if processes.is_main:
            gathered[name] = full.detach().to("cpu", copy=True)
    return gathered if processes.is_main else None


def dequantize(model):
    """The quantised (4- or 8-bit) base with every quantised layer replaced by a plain one
    holding its dequantised weights: the exact weights the quantised model computes with,
    and no quantization_config left in its config."""
    model = model.dequantize()
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model


def merge_adapter(base_model, adapter_folder: Path, tokenizer, folder: Path) -> None:
    """Load the saved adapter onto a (dequantised, for QLoRA) base, merge, and save."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_model, adapter_folder).merge_and_unload()
    save_model(merged, tokenizer, folder)


def write_model_card(
    config: TrainerConfig,
    hp: ResolvedHyperparameters,
    folder: Path,
    metrics: dict[str, float],
    digest: str,
    dataset_digest: str,
    evaluation: EvaluationResult | None = None,
) -> None:
    spec = config.spec
    method = spec.method
    metadata = {
        "base_model": spec.base_model.name,
        "base_model_revision": spec.base_model.revision,
        "library_name": "transformers" if method == FineTuningMethod.FULL else "peft",
        "pipeline_tag": "text-generation",
        "tags": ["kubetune", method.value.lower()],
        "kubetune": {
            "job": f"{config.job.namespace}/{config.job.name}",
            "job_uid": config.job.uid,
            "method": method.value,
            "dataset_format": spec.dataset.format.value,
            "dataset_digest": dataset_digest,
            "weights_digest": digest,
            "seed": spec.seed,
            "hyperparameters": hp.model_dump(mode="json", by_alias=True, exclude={"decisions"}),
            "metrics": metrics,
        },
    }
    if evaluation is not None:
        metadata["kubetune"]["evaluation"] = evaluation.model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
    front_matter = yaml.safe_dump(metadata, sort_keys=False)
    body = (
        f"# {config.job.name}\n\n"
        f"{method.value} fine-tune of `{spec.base_model.name}` by kubetune "
        f"(FineTuningJob `{config.job.namespace}/{config.job.name}`).\n\n"
        "| metric | value |\n|---|---|\n"
        + "".join(f"| {k} | {v:.6g} |\n" for k, v in metrics.items())
        + _evaluation_section(evaluation)
    )
    (folder / "README.md").write_text(f"---\n{front_matter}---\n\n{body}", encoding="utf-8")


def _evaluation_section(evaluation: EvaluationResult | None) -> str:
    if evaluation is None:
        return ""
    if evaluation.error:
        return f"\n## Evaluation\n\nThe evaluation failed: {evaluation.error}\n"

    return (
        f"\n## Evaluation\n\n{evaluation.examples} held-out examples "
        f"(`{evaluation.dataset_digest}`); per-example outputs in `../evaluation.jsonl`.\n\n"
        "| metric | base model | fine-tuned |\n|---|---|---|\n"
        + "".join(
            f"| {name} | {shown(value.base)} | {shown(value.tuned)} |\n"
            for name, value in evaluation.metrics.items()
        )
    )


def write_json(path: Path, document: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
    partial.replace(path)
