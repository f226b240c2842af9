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

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from kubetune.api.merge import (
    ADAPTER_METHODS,
    DENSITY_METHODS,
    EQUAL_RANK_METHODS,
    FULL_METHODS,
    MergeConfig,
    MergeFormat,
    MergeMethod,
    MergeReport,
)
from kubetune.api.trainer import TrainerTermination
from kubetune_trainer import modeling
from kubetune_trainer.config import format_validation_error
from kubetune_trainer.errors import InputNotFound, InvalidConfig
from kubetune_trainer.export import save_model, weights_digest
from kubetune_trainer.reporting import now

log = logging.getLogger(__name__)

DEFAULT_DENSITY = 0.5
# The merged adapter's name: PEFT saves the adapter named "default" at the folder's top,
# where PeftModel.from_pretrained looks, and any other name in a sub-folder.
MERGED = "default"
COLINEAR = 0.9995  # |cos| above which SLERP takes the straight line
FULL_KINDS = ("full", "merged")  # merged: a LoRA fine-tune folded into full weights
# What a full model's folder holds besides its weights, copied from the first parent.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def load_config(path: str | Path) -> MergeConfig:
    """A MergeConfig from a JSON or YAML file (the operator writes JSON)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"merge config {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return MergeConfig.model_validate(document)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise InvalidConfig(f"merge config {path} cannot be read: {err}") from err
    except ValidationError as err:
        raise InvalidConfig(
            f"merge config {path} is invalid:\n{format_validation_error(err)}"
        ) from err


def run(config: MergeConfig) -> TrainerTermination:
    """Check the parents, merge them into config.output, and report what was written."""
    kind, _lora_configs = check_parents(config)
    tokenizer = check_tokenizers(config)
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # DARE drops changes at random: the same merge, the same weights
    if kind == "adapter":
        rank, changed = merge_adapters(config, tokenizer, output)
        kind = "adapter" if config.format == MergeFormat.ADAPTER else "full"
    else:
        rank, changed = None, merge_full(config, tokenizer, output)
    digest = weights_digest(output)
    write_model_card(config, kind, rank, output, digest)
    log.info("merged %d models with %s into %s (%s)", len(config.parents), config.method, output, digest)
    report = MergeReport(
        kind=kind, digest=digest, rank=rank, parameters_changed=changed, completed_at=now()
    )
    return TrainerTermination(merge=report)


# --- checks --------------------------------------------------------------------------


def check_parents(config: MergeConfig) -> tuple[str, list]:
    """Whether the parents are adapters or full weights (and their LoRA configs): each is
    where and what its RegisteredModel says, and the method can combine them."""
    from peft import PeftConfig, PeftType

    if not config.parents:
        raise InvalidConfig("a merge needs at least one model")
    kinds, lora_configs = set(), []
    for parent in config.parents:
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
        if parent.kind == "adapter" and is_adapter:
            lora = PeftConfig.from_pretrained(folder)
            if lora.peft_type != PeftType.LORA:
                raise InvalidConfig(
                    f"{parent.name} is a {lora.peft_type.value} adapter: only LoRA adapters "
                    "can be merged"
                )
            if lora.use_dora or lora.use_rslora:  # add_weighted_adapter ignores both
                raise InvalidConfig(f"{parent.name} is a DoRA or rsLoRA adapter: PEFT cannot merge it")
            lora_configs.append(lora)
        elif parent.kind not in FULL_KINDS or is_adapter:
            raise InvalidConfig(
                f"{parent.name} is registered as {parent.kind!r} but {folder} holds "
                f"{'an adapter' if is_adapter else 'full weights'}"
            )
        kinds.add("adapter" if parent.kind == "adapter" else "full")
    if len(kinds) > 1:
        raise InvalidConfig(
            "LoRA adapters and full fine-tunes cannot be merged together: merge the adapters "
            "into full weights first (format full), then merge those"
        )
    kind = kinds.pop()
    allowed = ADAPTER_METHODS if kind == "adapter" else FULL_METHODS
    if config.method not in allowed:
        raise InvalidConfig(
            f"method {config.method} cannot merge {'LoRA adapters' if kind == 'adapter' else 'full fine-tunes'}: "
            f"use one of {', '.join(allowed)}"
        )
    weights = [p.weight for p in config.parents]
    if config.method == MergeMethod.SLERP and (
        len(weights) != 2 or min(weights) < 0 or sum(weights) <= 0
    ):
        raise InvalidConfig("slerp interpolates between two models with non-negative weights")
    if config.method in EQUAL_RANK_METHODS and kind == "adapter":
        ranks = {(c.r, tuple(sorted((c.rank_pattern or {}).items()))) for c in lora_configs}
        if len(ranks) > 1:
            listed = ", ".join(f"{p.name} r={c.r}" for p, c in zip(config.parents, lora_configs))
            raise InvalidConfig(
                f"method {config.method} combines the adapters' LoRA matrices element by element "
                f"and needs equal ranks, but {listed}: use svd, or adapters of one rank"
            )
    return kind, lora_configs


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
    """The tokenizer saved with the merge: the first parent's, else the base's. Tokens must
    mean the same to every parent: one vocabulary for them all and the base."""
    from transformers import AutoTokenizer

    named = []
    for parent in config.parents:
        folder = Path(parent.path)
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            named.append((parent.name, AutoTokenizer.from_pretrained(folder)))
    named.append(("the base model", modeling.load_tokenizer(base_source(config))))
    # Each against the first one: the first parent's that has one (or the base's).
    (first, reference), vocabulary = named[0], named[0][1].get_vocab()
    for name, tokenizer in named[1:]:
        if tokenizer.get_vocab() != vocabulary:
            raise InvalidConfig(
                f"{first} and {name} have different vocabularies: models with "
                "different tokenizers cannot be merged"
            )
    return reference


# --- LoRA adapters -------------------------------------------------------------------


def merge_adapters(config: MergeConfig, tokenizer, output: Path) -> tuple[int, float | None]:
    """PEFT's weighted adapter over the float32 base; the merged adapter's rank, and for
    format full the fraction of the base's parameters it changed."""
    from peft import PeftModel
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
    for name, parent in zip(names[1:], config.parents[1:]):
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
        raise InvalidConfig(f"PEFT cannot merge these adapters with {config.method}: {err}") from err
    model.set_adapter(MERGED)
    for name in names:
        model.delete_adapter(name)
    merged = model.peft_config[MERGED]
    # It starts as a copy of the first parent's config, which names the base as the
    # training pod saw it; name it as this merge loaded it.
    merged.base_model_name_or_path = config.base_model
    merged.revision = source.revision
    if config.format == MergeFormat.ADAPTER:
        save_model(model, tokenizer, output)
        return merged.r, None
    changed = changed_by_adapter(model) / total
    save_model(model.merge_and_unload(), tokenizer, output)
    return merged.r, changed


def changed_by_adapter(model) -> int:
    """How many base weights folding the merged adapter in changes (merging adds each
    layer's delta the same way)."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and (
            MERGED in module.lora_A or MERGED in module.lora_embedding_A
        ):
            weight = module.get_base_layer().weight
            changed += int((weight + module.get_delta_weight(MERGED) != weight).sum())
    return changed


def density(config: MergeConfig) -> float | None:
    if config.method not in DENSITY_METHODS:
        return None
    return config.density if config.density is not None else DEFAULT_DENSITY


# --- full weights --------------------------------------------------------------------


class Weights:
    """A saved model's tensors by name, read one at a time from its safetensors files."""

    def __init__(self, folder: Path, name: str) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise InvalidConfig(f"{name} has no safetensors weights in {folder}")
        self.name, self.folder = name, folder
        self.handles = {file: safe_open(folder / file, framework="pt") for file in files}
        self.where = {key: file for file, h in self.handles.items() for key in h.keys()}

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)


def base_folder(config: MergeConfig) -> Path:
    """The base model's files; from the Hub (into the cache) when it is not a folder."""
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
        if other.where.keys() != parents[0].where.keys():
            differ = sorted(other.where.keys() ^ parents[0].where.keys())
            raise InvalidConfig(
                f"{other.name} and {parents[0].name} hold different tensors "
                f"({', '.join(differ[:3])}...): they are not one architecture"
            )
    weights = torch.tensor([p.weight for p in config.parents])
    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    changed = total = 0
    for file, handle in parents[0].handles.items():
        merged = {}
        for key in sorted(handle.keys()):  # sorted: DARE draws in the same order each time
            original, tensors = base.get(key), [p.get(key) for p in parents]
            for weights_of, tensor in zip((base, *parents), (original, *tensors)):
                if tensor.shape != original.shape:
                    raise InvalidConfig(
                        f"{key} has shape {list(tensor.shape)} in {weights_of.name} but "
                        f"{list(original.shape)} in the base model"
                    )
            if tensors[0].is_floating_point():
                value = combine(config, original.float(), [t.float() for t in tensors], weights)
                value = value.to(tensors[0].dtype)
            else:  # integer buffers (positions, counters) are not weights to average
                value = tensors[0]
            changed += int((value.float() != original.float()).sum())
            total += value.numel()
            merged[key] = value.contiguous()
        save_file(merged, partial / file, metadata={"format": "pt"})
        del merged  # one shard of the result at a time
    for name in MODEL_FILES:
        if (parents[0].folder / name).is_file():
            shutil.copy(parents[0].folder / name, partial / name)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    return changed / total if total else 0.0


def combine(config: MergeConfig, base, tensors: list, weights: torch.Tensor):
    """One tensor of the merged model: the base plus the combined task vectors, or SLERP."""
    from peft.utils import merge_utils

    if config.method == MergeMethod.SLERP:
        first, second = weights.tolist()
        return slerp(second / (first + second), tensors[0], tensors[1])
    tasks = [tensor - base for tensor in tensors]
    sign, kept = config.majority_sign_method.value, density(config)
    if config.method == MergeMethod.LINEAR:
        delta = merge_utils.task_arithmetic(tasks, weights)
    elif config.method == MergeMethod.TIES:
        delta = merge_utils.ties(tasks, weights, kept, sign)
    elif config.method == MergeMethod.DARE_LINEAR:
        delta = merge_utils.dare_linear(tasks, weights, kept)
    else:
        delta = merge_utils.dare_ties(tasks, weights, kept, sign)
    return base + delta


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
    sin = torch.sin(angle)
    mixed = torch.sin((1 - t) * angle) / sin * a + torch.sin(t * angle) / sin * b
    return mixed.reshape(first.shape).to(first.dtype)


# --- model card ----------------------------------------------------------------------


def write_model_card(config: MergeConfig, kind: str, rank: int | None, folder: Path, digest: str):
    settings = {}
    if config.method in DENSITY_METHODS:
        settings["density"] = density(config)
    if config.method in (MergeMethod.TIES, MergeMethod.DARE_TIES):
        settings["majority_sign_method"] = config.majority_sign_method.value
    if config.method == MergeMethod.SVD:
        settings["svd_rank"] = rank
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
            "parents": [
                {"name": p.name, "weight": p.weight, "digest": p.digest} for p in config.parents
            ],
            "weights_digest": digest,
        },
    }
    details = "".join(f", {k.replace('_', ' ')} {v}" for k, v in settings.items())
    body = (
        f"# {config.name}\n\n"
        f"Merged from {', '.join(f'`{p.name}`' for p in config.parents)} with "
        f"{config.method.value}{details}; weights "
        f"{', '.join(f'{p.weight:g}' for p in config.parents)}. "
        f"{'A LoRA adapter' if kind == 'adapter' else 'Full weights'} of `{config.base_model}`, "
        f"by kubetune (ModelMerge `{config.namespace}/{config.name}`).\n"
    )
    front_matter = yaml.safe_dump(metadata, sort_keys=False)
    (folder / "README.md").write_text(f"---\n{front_matter}---\n\n{body}", encoding="utf-8")
