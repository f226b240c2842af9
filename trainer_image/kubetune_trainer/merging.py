"""The merge pod (mode merge): RegisteredModels of one base model combined into one.

LoRA adapters are combined by PEFT's add_weighted_adapter on the float32 base and saved
as one adapter or folded into the base's weights. Full fine-tunes are combined as task
vectors over the base with PEFT's merge_utils (or interpolated by SLERP, which PEFT
lacks), one tensor at a time from memory-mapped safetensors: the pod holds one shard of
the result plus one tensor of each model, whatever the number of parents. The operator
checks what can be merged before it starts the pod; the pod checks again on the weights
it actually reads.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from peft.utils import merge_utils

from kubetune.api import merge as mm
from kubetune.api.merge import MergeConfig, MergeFormat, MergeMethod, MergeParent
from kubetune.api.trainer import TrainerTermination
from kubetune_trainer import config as config_file
from kubetune_trainer import modeling
from kubetune_trainer.errors import InputNotFound, InvalidConfig
from kubetune_trainer.export import save_model, weights_digest
from kubetune_trainer.reporting import now

log = logging.getLogger(__name__)

DEFAULT_DENSITY = 0.5
# PEFT saves the adapter named "default" at the folder's top, where from_pretrained
# looks, and an adapter of any other name in a sub-folder.
MERGED = "default"
COLINEAR = 0.9995  # |cos| above which SLERP takes the straight line
FULL_KINDS = ("full", "merged")  # merged: a LoRA fine-tune already folded into full weights
# A full model's folder besides its weights, copied from the first parent (whose dtypes
# the merge keeps).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
# Task-vector merges of full weights: (task vectors, weights, density, sign method) -> delta.
TASK_VECTOR_MERGES = {
    MergeMethod.LINEAR: lambda tasks, w, _density, _sign: merge_utils.task_arithmetic(tasks, w),
    MergeMethod.TIES: merge_utils.ties,
    MergeMethod.DARE_LINEAR: lambda tasks, w, density, _sign: merge_utils.dare_linear(
        tasks, w, density
    ),
    MergeMethod.DARE_TIES: merge_utils.dare_ties,
}


def load_config(path: str | Path) -> MergeConfig:
    """A MergeConfig from a JSON or YAML file (the operator writes JSON)."""
    return config_file.load_config(path, MergeConfig, "merge config")


def run(config: MergeConfig) -> TrainerTermination:
    """Check the parents, merge them into config.output, and report what was written."""
    kind = check_parents(config)
    tokenizer = check_tokenizers(config)
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # DARE drops changes at random: the same merge, the same weights
    lora = {}
    if kind == "adapter":
        merged, changed = merge_adapters(config, tokenizer, output)
        kind = "adapter" if config.format == MergeFormat.ADAPTER else "full"
        lora = {"rank": merged.r}
        if kind == "adapter":  # what the saved adapter says, for its RegisteredModel
            modules = merged.target_modules
            lora |= {
                "lora_alpha": int(merged.lora_alpha),
                "target_modules": sorted(modules) if not isinstance(modules, str) else None,
            }
    else:
        changed = merge_full(config, tokenizer, output)
    digest = weights_digest(output)
    write_model_card(config, kind, lora.get("rank"), output, digest)
    log.info("merged %s with %s into %s (%s)", config.name, config.method, output, digest)
    report = mm.MergeReport(
        kind=kind, digest=digest, parameters_changed=changed, completed_at=now(), **lora
    )
    return TrainerTermination(merge=report)


# --- checks --------------------------------------------------------------------------


def check_parents(config: MergeConfig) -> str:
    """adapter or full: each parent is where and what its RegisteredModel says, and the
    method can combine them."""
    if not config.parents:
        raise InvalidConfig("a merge needs at least one model")
    loras = [check_parent(parent) for parent in config.parents]
    if len({lora is None for lora in loras}) > 1:
        raise InvalidConfig(
            "LoRA adapters and full fine-tunes cannot be merged together: fold the adapters "
            "into full weights first (a merge with format full), then merge those"
        )
    kind, allowed = (
        ("LoRA adapters", mm.ADAPTER_METHODS) if loras[0] else ("full fine-tunes", mm.FULL_METHODS)
    )
    if config.method not in allowed:
        raise InvalidConfig(f"method {config.method} cannot merge {kind}: use {', '.join(allowed)}")
    weights = [p.weight for p in config.parents]
    if config.method == MergeMethod.SLERP and (
        len(weights) != 2 or min(weights) < 0 or sum(weights) <= 0
    ):
        raise InvalidConfig("slerp interpolates between two models, with non-negative weights")
    ranks = {(c.r, tuple(sorted(c.rank_pattern.items()))) for c in loras if c is not None}
    if config.method in mm.EQUAL_RANK_METHODS and len(ranks) > 1:
        listed = ", ".join(f"{p.name} r={c.r}" for p, c in zip(config.parents, loras, strict=True))
        raise InvalidConfig(
            f"method {config.method} combines the adapters' LoRA matrices element by element "
            f"and needs equal ranks, but {listed}: use svd, or adapters of one rank"
        )
    return "adapter" if loras[0] else "full"


def check_parent(parent: MergeParent):
    """The parent's LoraConfig (None for full weights), once its weights are checked."""
    from peft import PeftConfig, PeftType

    folder = Path(parent.path)
    if not folder.is_dir():
        raise InputNotFound(f"the weights of {parent.name} are not at {folder}")
    try:
        digest = weights_digest(folder)
    except RuntimeError as err:
        raise InputNotFound(f"the weights of {parent.name}: {err}") from err
    if digest != parent.digest:
        raise InvalidConfig(
            f"the weights of {parent.name} changed since they were registered "
            f"(digest {digest}, registered {parent.digest})"
        )
    is_adapter = (folder / "adapter_config.json").is_file()
    if parent.kind not in ("adapter", *FULL_KINDS) or is_adapter != (parent.kind == "adapter"):
        held = "an adapter" if is_adapter else "full weights"
        raise InvalidConfig(
            f"{parent.name} is registered as {parent.kind!r} but {folder} holds {held}"
        )
    if not is_adapter:
        return None
    lora = PeftConfig.from_pretrained(folder)
    if lora.peft_type != PeftType.LORA:
        raise InvalidConfig(
            f"{parent.name} is a {lora.peft_type.value} adapter: only LoRA adapters can be merged"
        )
    if lora.use_dora or lora.use_rslora:  # add_weighted_adapter would get both wrong
        raise InvalidConfig(f"{parent.name} is a DoRA or rsLoRA adapter: PEFT cannot merge it")
    return lora


def base_source(config: MergeConfig) -> modeling.ModelSource:
    local = Path(config.base_model).is_dir()
    if not local and config.base_model.startswith(("/", ".")):
        raise InputNotFound(f"base model folder {config.base_model} does not exist")
    return modeling.ModelSource(
        name_or_path=config.base_model,
        revision=None if local else config.base_revision,
        cache_dir=config.cache,
        trust_remote_code=False,
        token=os.environ.get("HF_TOKEN") or None,
    )


def check_tokenizers(config: MergeConfig):
    """The tokenizer saved with the merge: the first parent's, else the base's. A token
    must mean the same to every parent: one vocabulary for them all and the base."""
    from transformers import AutoTokenizer

    named = [
        (p.name, AutoTokenizer.from_pretrained(p.path))
        for p in config.parents
        if any((Path(p.path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    ]
    named.append(("the base model", modeling.load_tokenizer(base_source(config))))
    (first, reference), vocabulary = named[0], named[0][1].get_vocab()
    for name, tokenizer in named[1:]:
        if tokenizer.get_vocab() != vocabulary:
            raise InvalidConfig(
                f"{first} and {name} have different vocabularies: models with different "
                "tokenizers cannot be merged"
            )
    return reference


def density(config: MergeConfig) -> float | None:
    if config.method not in mm.DENSITY_METHODS:
        return None
    return config.density if config.density is not None else DEFAULT_DENSITY


# --- LoRA adapters -------------------------------------------------------------------


def merge_adapters(config: MergeConfig, tokenizer, output: Path):
    """PEFT's weighted adapter over the float32 base; the merged adapter's LoraConfig, and
    for format full the fraction of the base's parameters it changed."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    source = base_source(config)
    try:  # never quantised: the merge changes the exact weights the adapters were added to
        base = AutoModelForCausalLM.from_pretrained(
            source.name_or_path, dtype=torch.float32, **source.kwargs()
        )
    except OSError as err:
        raise InputNotFound(f"base model {source.name_or_path!r} cannot be loaded: {err}") from err
    total = sum(p.numel() for p in base.parameters())
    names = [f"parent{i}" for i in range(len(config.parents))]
    model = PeftModel.from_pretrained(base, config.parents[0].path, adapter_name=names[0])
    for name, parent in zip(names[1:], config.parents[1:], strict=True):
        model.load_adapter(parent.path, adapter_name=name)
    try:  # our method names are PEFT's combination types
        model.add_weighted_adapter(
            names,
            [p.weight for p in config.parents],
            MERGED,
            combination_type=config.method.value,
            svd_rank=config.svd_rank,
            density=density(config),
            majority_sign_method=config.majority_sign_method.value,
        )
    except ValueError as err:
        message = f"PEFT cannot merge these adapters with {config.method}: {err}"
        raise InvalidConfig(message) from err
    model.set_adapter(MERGED)
    for name in names:
        model.delete_adapter(name)
    merged = model.peft_config[MERGED]
    # A copy of the first parent's config, naming the base as its training pod saw it.
    merged.base_model_name_or_path, merged.revision = config.base_model, source.revision
    if config.format == MergeFormat.ADAPTER:
        save_model(model, tokenizer, output)
        return merged, None
    changed = 0  # folding in adds each layer's delta to its weight, as counted here
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and MERGED in (*layer.lora_A, *layer.lora_embedding_A):
            weight = layer.get_base_layer().weight
            changed += int((weight + layer.get_delta_weight(MERGED) != weight).sum())
    save_model(model.merge_and_unload(), tokenizer, output)
    return merged, changed / total


# --- full weights --------------------------------------------------------------------


class Weights:
    """A saved model's tensors by name, read one at a time from its safetensors files."""

    def __init__(self, folder: Path, name: str) -> None:
        from safetensors import safe_open

        files = sorted(p.name for p in folder.glob("*.safetensors"))  # one, or the shards
        if not files:
            raise InvalidConfig(f"{name} has no safetensors weights in {folder}")
        self.name, self.folder = name, folder
        self.files = {file: safe_open(folder / file, framework="pt") for file in files}
        self.where = {key: file for file, handle in self.files.items() for key in handle.keys()}  # noqa: SIM118

    def get(self, key: str) -> torch.Tensor:
        return self.files[self.where[key]].get_tensor(key)


def base_folder(config: MergeConfig) -> Path:
    """The base model's files: its folder, or its Hub snapshot (into the cache)."""
    source = base_source(config)
    if Path(source.name_or_path).is_dir():
        return Path(source.name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source.name_or_path,
                revision=source.revision,
                cache_dir=source.cache_dir,
                token=source.token,
                allow_patterns=["*.safetensors", "*.json"],
            )
        )
    except Exception as err:  # offline, unknown repository, no access: all "not found"
        raise InputNotFound(f"base model {source.name_or_path!r} cannot be loaded: {err}") from err


def merge_full(config: MergeConfig, tokenizer, output: Path) -> float:
    """Full fine-tunes combined tensor by tensor, written in the first parent's layout
    and dtypes; the fraction of the base's parameters that changed."""
    from safetensors.torch import save_file

    base = Weights(base_folder(config), "the base model")
    parents = [Weights(Path(p.path), p.name) for p in config.parents]
    for other in (base, *parents[1:]):
        if differ := sorted(other.where.keys() ^ parents[0].where.keys()):
            raise InvalidConfig(
                f"{other.name} and {parents[0].name} hold different tensors "
                f"({', '.join(differ[:3])}...): they are not one architecture"
            )
    weights = torch.tensor([p.weight for p in config.parents])
    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    changed = total = 0
    for file, handle in parents[0].files.items():  # one shard of the result at a time
        merged = {}
        for key in sorted(handle.keys()):  # sorted: DARE draws in the same order each time
            original, tensors = base.get(key), [p.get(key) for p in parents]
            if any(tensor.shape != original.shape for tensor in tensors):
                shapes = ", ".join(
                    f"{list(t.shape)} in {p.name}" for t, p in zip(tensors, parents, strict=True)
                )
                raise InvalidConfig(f"{key} is {list(original.shape)} in the base model, {shapes}")
            if tensors[0].is_floating_point():
                value = combine(config, original.float(), [t.float() for t in tensors], weights)
                value = value.to(tensors[0].dtype)
            else:  # integer buffers (positions, counters) are not weights to average
                value = tensors[0]
            changed += int((value.float() != original.float()).sum())
            total += value.numel()
            merged[key] = value.contiguous()
        save_file(merged, partial / file, metadata={"format": "pt"})
    for name in MODEL_FILES:
        if (parents[0].folder / name).is_file():
            shutil.copy(parents[0].folder / name, partial / name)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    return changed / total if total else 0.0


def combine(config: MergeConfig, base, tensors: list, weights: torch.Tensor):
    """One tensor of the merged model: the base plus the combined task vectors, or SLERP."""
    if config.method == MergeMethod.SLERP:
        first, second = weights.tolist()
        return slerp(second / (first + second), tensors[0], tensors[1])
    tasks = [tensor - base for tensor in tensors]
    merge = TASK_VECTOR_MERGES[config.method]
    return base + merge(tasks, weights, density(config), config.majority_sign_method.value)


def slerp(t: float, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors, flattened (PEFT has none): along the arc
    between them, so the result keeps their norm where a straight mix of two tensors that
    point apart shrinks it. Nearly colinear (or zero) tensors take the straight line,
    where the arc's formula would divide by sin(angle) ~ 0."""
    a, b = first.flatten().double(), second.flatten().double()
    norms = a.norm() * b.norm()
    cos = float((a @ b) / norms) if norms > 0 else 1.0
    if abs(cos) > COLINEAR:
        return (1 - t) * first + t * second
    angle = torch.arccos(torch.tensor(cos, dtype=torch.float64))
    mixed = (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)
    return mixed.reshape(first.shape).to(first.dtype)


# --- model card ----------------------------------------------------------------------


def write_model_card(config: MergeConfig, kind: str, rank: int | None, folder: Path, digest: str):
    sign = config.majority_sign_method.value
    settings = {
        "density": density(config),
        "majority_sign_method": sign if config.method in ("ties", "dare_ties") else None,
        "svd_rank": rank if config.method == MergeMethod.SVD else None,
    }
    settings = {k: v for k, v in settings.items() if v is not None}
    parents = [{"name": p.name, "weight": p.weight, "digest": p.digest} for p in config.parents]
    metadata = {
        "base_model": config.base_model,
        "base_model_revision": config.base_revision,
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["kubetune", "merge", config.method.value],
        "kubetune": {
            "merge": f"{config.namespace}/{config.name}",
            "method": config.method.value,
            **settings,
            "kind": kind,
            "parents": parents,
            "weights_digest": digest,
        },
    }
    details = "".join(f", {k.replace('_', ' ')} {v}" for k, v in settings.items())
    body = (
        f"# {config.name}\n\nMerged from {', '.join(f'`{p.name}`' for p in config.parents)} "
        f"with {config.method.value}{details}; weights "
        f"{', '.join(f'{p.weight:g}' for p in config.parents)}. "
        f"{'A LoRA adapter' if kind == 'adapter' else 'Full weights'} of `{config.base_model}`, "
        f"by kubetune (ModelMerge `{config.namespace}/{config.name}`).\n"
    )
    front_matter = yaml.safe_dump(metadata, sort_keys=False)
    (folder / "README.md").write_text(f"---\n{front_matter}---\n\n{body}", encoding="utf-8")
