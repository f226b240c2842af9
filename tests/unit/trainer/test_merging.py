"""The merge pod (mode merge) on the tiny model: each method's weights against its formula,
the saved models load, and what cannot be merged is refused with a clear message."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from kubetune_trainer import merging
from kubetune_trainer.errors import InputNotFound, InvalidConfig
from kubetune_trainer.export import weights_digest
from kubetune_trainer.main import main
from safetensors.torch import load_file

from kubetune.api.merge import MergeConfig, MergeParent
from kubetune.api.trainer import TrainerTermination

TARGETS = ["q_proj", "v_proj"]
Q = "model.layers.0.self_attn.q_proj"
ADAPTER_Q = f"base_model.model.{Q}"
NORM = "model.layers.0.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"


def make_adapter(base_dir: Path, folder: Path, *, r: int, alpha: int, seed: int) -> Path:
    """A LoRA adapter with random A and B (init_lora_weights=False): no training needed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def make_full(base_dir: Path, folder: Path, *, seed: int) -> Path:
    """A "full fine-tune": every weight of the base moved by seeded noise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parents(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parents")
    return {
        "a": make_adapter(tiny_model_dir, root / "a", r=4, alpha=8, seed=1),  # scaling 2
        "b": make_adapter(tiny_model_dir, root / "b", r=4, alpha=4, seed=2),  # scaling 1
        "c": make_adapter(tiny_model_dir, root / "c", r=2, alpha=2, seed=3),  # scaling 1
        "f1": make_full(tiny_model_dir, root / "f1", seed=4),
        "f2": make_full(tiny_model_dir, root / "f2", seed=5),
    }


def config_for(base, output, models, method, **settings) -> MergeConfig:
    """models: (name, folder, weight) triples; kind from the folder."""
    return MergeConfig(
        name="merged",
        namespace="ns",
        base_model=str(base),
        parents=[
            MergeParent(
                name=name,
                path=str(folder),
                kind="adapter" if (folder / "adapter_config.json").is_file() else "full",
                weight=weight,
                digest=weights_digest(folder),
            )
            for name, folder, weight in models
        ],
        method=method,
        format=settings.pop("format", "adapter"),
        output=str(output),
        **settings,
    )


def merge(tiny_model_dir, tmp_path, parents, models, method, **settings):
    triples = [(name, parents[name], weight) for name, weight in models]
    config = config_for(tiny_model_dir, tmp_path / "out", triples, method, **settings)
    return merging.run(config).merge, tmp_path / "out"


def lora(folder: Path, module: str = ADAPTER_Q) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A module's A, B and scaling (alpha / r) in a saved adapter."""
    tensors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    return (
        tensors[f"{module}.lora_A.weight"],
        tensors[f"{module}.lora_B.weight"],
        config["lora_alpha"] / config["r"],
    )


def ties_reference(tasks, weights, density):
    """TIES written out (as PEFT defines it): keep each task vector's top `density` by
    magnitude, elect each entry's sign by the total of the trimmed vectors, and average
    the weighted entries that agree with it."""
    trimmed = []
    for task in tasks:
        k = int(density * task.numel())
        threshold = task.abs().flatten().topk(k).values.min() if density < 1 else 0.0
        trimmed.append(torch.where(task.abs() >= threshold, task, torch.zeros_like(task)))
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    weighted = stacked * torch.tensor(weights).view(-1, *[1] * tasks[0].dim())
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_adapters_linear_is_peft_combination_and_loads(tiny_model_dir, tmp_path, parents):
    """PEFT's linear combination of LoRA adapters (peft/tuners/lora/model.py,
    _generalized_task_arithmetic_weighted_adapter): with s_i = w_i * scaling_i,
    A = sum(sign(s_i) * sqrt(|s_i|) * A_i) and B = sum(sqrt(|s_i|) * B_i), and the merged
    adapter has lora_alpha = r (scaling 1). A negative weight flips A's term only."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    weights = [0.7, -0.4]
    report, out = merge(tiny_model_dir, tmp_path, parents, [("a", 0.7), ("b", -0.4)], "linear")
    assert report.kind == "adapter" and report.rank == 4 and report.parameters_changed is None
    assert report.lora_alpha == 4 and report.target_modules == sorted(TARGETS)
    assert report.digest == weights_digest(out)
    expected_a, expected_b = 0, 0
    for name, weight in zip(("a", "b"), weights, strict=True):
        a, b, scaling = lora(parents[name])
        s = weight * scaling
        expected_a = expected_a + math.copysign(math.sqrt(abs(s)), s) * a
        expected_b = expected_b + math.sqrt(abs(s)) * b
    merged_a, merged_b, merged_scaling = lora(out)
    assert merged_scaling == 1.0
    torch.testing.assert_close(merged_a, expected_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged_b, expected_b, rtol=1e-6, atol=1e-7)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert not (out / "default").exists()  # the adapter at the top, not in a sub-folder
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "Merged from `a`, `b` with linear; weights 0.7, -0.4" in card
    assert yaml.safe_load(card.split("---")[1])["kubetune"]["weights_digest"] == report.digest
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_A["default"].weight, merged_a)
    auto = AutoPeftModelForCausalLM.from_pretrained(out)  # finds the base by its config
    assert auto(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == base.config.vocab_size


def test_adapters_svd_reproduces_the_weighted_sum_of_updates(tiny_model_dir, tmp_path, parents):
    """svd factors sum(w_i * B_i A_i * scaling_i) again; at rank r1 + r2 it is exact."""
    report, out = merge(
        tiny_model_dir, tmp_path, parents, [("a", 1.0), ("c", 0.5)], "svd", svd_rank=6
    )
    assert report.rank == 6
    expected = 0
    for name, weight in (("a", 1.0), ("c", 0.5)):
        a, b, scaling = lora(parents[name])
        expected = expected + weight * scaling * (b @ a)
    merged_a, merged_b, scaling = lora(out)
    assert merged_a.shape[0] == 6
    torch.testing.assert_close(scaling * merged_b @ merged_a, expected, rtol=1e-4, atol=1e-5)


def test_adapters_ties_as_full_weights(tiny_model_dir, tmp_path, parents):
    """TIES on the adapters' A and B matrices (as PEFT combines them, weights split as in
    the linear test), folded into the base: base + B @ A, other weights untouched."""
    weights, density = [1.0, 0.8], 0.5
    report, out = merge(
        tiny_model_dir,
        tmp_path,
        parents,
        [("a", 1.0), ("b", 0.8)],
        "ties",
        density=density,
        format="full",
    )
    assert report.kind == "full" and report.rank == 4
    pieces = [lora(parents[name]) for name in ("a", "b")]
    split = [math.sqrt(w * s) for w, (_a, _b, s) in zip(weights, pieces, strict=True)]
    merged_a = ties_reference([a for a, _b, _s in pieces], split, density)
    merged_b = ties_reference([b for _a, b, _s in pieces], split, density)
    base = load_file(tiny_model_dir / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    torch.testing.assert_close(saved[f"{Q}.weight"], base[f"{Q}.weight"] + merged_b @ merged_a)
    assert torch.equal(saved[EMBED], base[EMBED])
    targeted = sum(v.numel() for k, v in base.items() if any(t in k for t in TARGETS))
    assert 0.5 * targeted / sum(v.numel() for v in base.values()) < report.parameters_changed
    assert report.parameters_changed <= targeted / sum(v.numel() for v in base.values())
    assert report.digest == weights_digest(out)


def test_full_linear_is_the_weighted_sum_of_task_vectors(tiny_model_dir, tmp_path, parents):
    from transformers import AutoModelForCausalLM

    report, out = merge(tiny_model_dir, tmp_path, parents, [("f1", 0.5), ("f2", 0.5)], "linear")
    assert report.kind == "full" and report.rank is None and report.parameters_changed > 0.99
    base = load_file(tiny_model_dir / "model.safetensors")
    f1, f2 = (load_file(parents[n] / "model.safetensors") for n in ("f1", "f2"))
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == base.keys()
    for key in base:
        expected = base[key] + (0.5 * (f1[key] - base[key]) + 0.5 * (f2[key] - base[key]))
        torch.testing.assert_close(saved[key], expected, rtol=0, atol=1e-7)
        torch.testing.assert_close(saved[key], (f1[key] + f2[key]) / 2, rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_full_ties_matches_a_reference(tiny_model_dir, tmp_path, parents):
    weights, density = [1.0, 0.6], 0.3
    report, out = merge(
        tiny_model_dir, tmp_path, parents, [("f1", 1.0), ("f2", 0.6)], "ties", density=density
    )
    base = load_file(tiny_model_dir / "model.safetensors")
    f1, f2 = (load_file(parents[n] / "model.safetensors") for n in ("f1", "f2"))
    saved = load_file(out / "model.safetensors")
    for key in (f"{Q}.weight", EMBED):
        tasks = [f1[key] - base[key], f2[key] - base[key]]
        expected = base[key] + ties_reference(tasks, weights, density)
        torch.testing.assert_close(saved[key], expected, rtol=1e-6, atol=1e-7)
    assert 0.3 < report.parameters_changed < 0.6  # 30% of each kept, partly overlapping


def test_full_dare_is_reproducible(tiny_model_dir, tmp_path, parents):
    models = [("f1", 1.0), ("f2", 1.0)]
    first, _ = merge(tiny_model_dir, tmp_path / "1", parents, models, "dare_ties", density=0.5)
    second, _ = merge(tiny_model_dir, tmp_path / "2", parents, models, "dare_ties", density=0.5)
    assert first.digest == second.digest


def reference_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x, y = a.flatten().double(), b.flatten().double()
    omega = torch.arccos(torch.dot(x / x.norm(), y / y.norm()))
    mixed = (torch.sin((1 - t) * omega) * x + torch.sin(t * omega) * y) / torch.sin(omega)
    return mixed.view(a.shape).float()


def test_full_slerp_endpoints_and_midpoint(tiny_model_dir, tmp_path, parents):
    f1, f2 = (load_file(parents[n] / "model.safetensors") for n in ("f1", "f2"))
    for weights, expected in (((1.0, 0.0), f1), ((0.0, 1.0), f2)):
        models = list(zip(("f1", "f2"), weights, strict=True))
        merge(tiny_model_dir, tmp_path / str(weights), parents, models, "slerp")
        saved = load_file(tmp_path / str(weights) / "out" / "model.safetensors")
        assert all(torch.equal(saved[key], expected[key]) for key in expected)
    merge(tiny_model_dir, tmp_path / "mid", parents, [("f1", 2.0), ("f2", 2.0)], "slerp")
    saved = load_file(tmp_path / "mid" / "out" / "model.safetensors")
    key = f"{Q}.weight"
    torch.testing.assert_close(saved[key], reference_slerp(0.5, f1[key], f2[key]))
    assert saved[key].norm() > ((f1[key] + f2[key]) / 2).norm() * 1.05  # the arc, not the chord
    # The norm weights (ones + small noise) are nearly colinear: a straight mix.
    torch.testing.assert_close(saved[NORM], (f1[NORM] + f2[NORM]) / 2)


def refused(tiny_model_dir, tmp_path, parents, models, method, failure, match, **settings):
    triples = [(name, parents.get(name, tmp_path / name), weight) for name, weight in models]
    config = config_for(tiny_model_dir, tmp_path / "out", triples, method, **settings)
    with pytest.raises(failure, match=match):
        merging.run(config)
    assert not (tmp_path / "out").exists()


def test_refusals(tiny_model_dir, tmp_path, parents):
    models = [("a", 1.0), ("b", 1.0)]
    config = config_for(
        tiny_model_dir, tmp_path / "out", [(n, parents[n], w) for n, w in models], "linear"
    )
    config.parents[1].digest = "sha256:" + "0" * 64
    with pytest.raises(InvalidConfig, match="the weights of b changed since they were registered"):
        merging.run(config)
    config.parents[1].path = str(tmp_path / "gone")
    with pytest.raises(InputNotFound, match="the weights of b are not at"):
        merging.run(config)

    cases = [
        ([("a", 1.0), ("c", 1.0)], "linear", "needs equal ranks, but a r=4, c r=2: use svd"),
        ([("a", 1.0), ("c", 1.0)], "dare_ties", "needs equal ranks"),
        ([("a", 1.0), ("f1", 1.0)], "linear", "adapters and full fine-tunes cannot be merged"),
        ([("a", 1.0), ("b", 1.0)], "slerp", "method slerp cannot merge LoRA adapters"),
        ([("f1", 1.0), ("f2", 1.0)], "svd", "method svd cannot merge full fine-tunes"),
    ]
    for models, method, match in cases:
        refused(tiny_model_dir, tmp_path, parents, models, method, InvalidConfig, match)


def test_refuses_other_tokenizers_and_adapters(tiny_model_dir, tmp_path, parents):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = shutil.copytree(parents["b"], tmp_path / "other")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(other)
    match = "other and the base model have different vocabularies"
    with pytest.raises(InvalidConfig, match=match):
        merging.run(
            config_for(
                tiny_model_dir,
                tmp_path / "out",
                [("a", parents["a"], 1), ("other", other, 1)],
                "svd",
            )
        )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    get_peft_model(base, prefix).save_pretrained(tmp_path / "prefix")
    with pytest.raises(InvalidConfig, match="PREFIX_TUNING adapter: only LoRA adapters"):
        merging.run(
            config_for(
                tiny_model_dir,
                tmp_path / "out",
                [("a", parents["a"], 1), ("prefix", tmp_path / "prefix", 1)],
                "svd",
            )
        )


def test_main_writes_the_termination_message(tiny_model_dir, tmp_path, parents):
    config = config_for(
        tiny_model_dir,
        tmp_path / "out",
        [("a", parents["a"], 1.0), ("b", parents["b"], 1.0)],
        "ties",
    )
    good = tmp_path / "merge.yaml"
    good.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    log = tmp_path / "termination"
    assert main(["--config", str(good), "--mode", "merge", "--termination-log", str(log)]) == 0
    termination = TrainerTermination.model_validate_json(log.read_text())
    assert termination.error is None and termination.merge.kind == "adapter"
    assert termination.merge.digest == weights_digest(tmp_path / "out")

    config.parents[0].digest = "sha256:" + "1" * 64
    bad = tmp_path / "merge.json"
    bad.write_text(config.model_dump_json(by_alias=True))
    assert main(["--config", str(bad), "--mode", "merge", "--termination-log", str(log)]) == 64
    error = json.loads(log.read_text())["error"]
    assert error["reason"] == "InvalidConfig" and "the weights of a changed" in error["message"]
