"""End-to-end trainer runs on the tiny model: every method learns, outputs, resume, merge."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml
from kubetune_trainer.export import weights_digest
from kubetune_trainer.main import EXIT_INTERRUPTED, main

from .helpers import make_config, write_config

METHOD_SETTINGS = {
    "FULL": ({}, {"learningRate": 3e-3}),
    "LORA": ({"lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}, {"learningRate": 2e-2}),
    "QLORA": (
        {"quantization": {"computeDtype": "float32"}, "lora": {"rank": 8, "alpha": 16}},
        {"learningRate": 2e-2},
    ),
    "PREFIX_TUNING": ({"prefixTuning": {"numVirtualTokens": 8}}, {"learningRate": 5e-2}),
    "PROMPT_TUNING": ({"promptTuning": {"numVirtualTokens": 8}}, {"learningRate": 3e-1}),
}
# A soft prompt on a 64-wide random model can only nudge its hidden states: it learns
# less in the same budget than methods that change weights.
REQUIRED_DROP = {"PROMPT_TUNING": 0.15}


def train(tmp_path, model_dir, *, name="run", callbacks=(), mode="train", **kwargs):
    config = make_config(tmp_path, model_dir, output=tmp_path / name, **kwargs)
    config_file = write_config(config, tmp_path / f"{name}.json")
    termination = tmp_path / f"{name}.termination"
    code = main(
        ["--config", str(config_file), "--mode", mode, "--termination-log", str(termination)],
        callbacks=callbacks,
    )
    message = json.loads(termination.read_text()) if termination.exists() else None
    return code, message, tmp_path / name


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_each_method_lowers_held_out_loss(tmp_path, tiny_model_dir, method):
    spec, hyperparameters = METHOD_SETTINGS[method]
    code, message, _output = train(
        tmp_path,
        tiny_model_dir,
        method=method,
        spec=spec,
        hyperparameters={"epochs": 3, **hyperparameters},
    )
    assert code == 0, message
    metrics = message["result"]["metrics"]
    assert metrics["steps"] == 21
    assert metrics["eval_loss"] < metrics["eval_loss_initial"] - REQUIRED_DROP.get(method, 0.3)
    kind = "full" if method == "FULL" else "adapter"
    assert message["result"]["artifact"]["kind"] == kind


def test_outputs_reports_and_model_card(tmp_path, tiny_model_dir):
    code, message, output = train(
        tmp_path,
        tiny_model_dir,
        spec={"output": {"volume": {"claimName": "out"}, "mergeAdapter": True}},
        hyperparameters={"loggingSteps": 3},
    )
    assert code == 0
    result = message["result"]
    assert result["artifact"] == {
        "path": "model",
        "kind": "adapter",
        "digest": weights_digest(output / "model"),
        "mergedPath": "merged",
    }
    assert (output / "model" / "adapter_model.safetensors").is_file()
    assert (output / "model" / "tokenizer.json").is_file()
    assert (output / "merged" / "model.safetensors").is_file()
    card = (output / "model" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "tiny"
    assert front["kubetune"]["weights_digest"] == result["artifact"]["digest"]
    assert front["kubetune"]["dataset_digest"] == result["datasetDigest"]
    saved = json.loads((output / "trainer_config.json").read_text())
    assert saved["hyperparameters"]["batchSize"] == 4
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["eval_loss"] == result["metrics"]["eval_loss"]
    report = json.loads((output / "report.json").read_text())
    assert report["progress"]["step"] == report["progress"]["totalSteps"] == 14
    assert report["progress"]["tokensPerSecond"] > 0
    assert report["result"]["artifact"]["digest"] == result["artifact"]["digest"]
    assert report["validation"]["trainRows"] == 56 and report["validation"]["evalRows"] == 8


def test_progress_every_logging_steps(tmp_path, tiny_model_dir):
    seen = []
    code, _message, _output = train(
        tmp_path,
        tiny_model_dir,
        hyperparameters={"loggingSteps": 4},
        callbacks=[
            lambda step: seen.append(
                json.loads((tmp_path / "run" / "report.json").read_text())
                .get("progress", {})
                .get("step")
            )
        ],
    )
    assert code == 0
    # The callback runs after the trainer's own report for the same step.
    assert [s for s in seen if s is not None] == [4] * 4 + [8] * 4 + [12] * 2 + [14]


def test_sigterm_checkpoint_and_resume_match_an_uninterrupted_run(tmp_path, tiny_model_dir):
    settings = {"spec": {"lora": {"dropout": 0.1}}, "hyperparameters": {"saveSteps": 4}}
    code, straight, _ = train(tmp_path, tiny_model_dir, name="straight", **settings)
    assert code == 0

    def preempt(step):
        if step.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    code, _message, output = train(
        tmp_path, tiny_model_dir, name="resumed", callbacks=[preempt], **settings
    )
    assert code == EXIT_INTERRUPTED
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert not (output / "model").exists()
    code, resumed, _ = train(tmp_path, tiny_model_dir, name="resumed", **settings)
    assert code == 0
    first = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    second = json.loads((output / "metrics.json").read_text())
    assert [step for step, _ in second["loss_history"]] == list(range(1, 15))
    assert [loss for _, loss in second["loss_history"]] == pytest.approx(
        [loss for _, loss in first["loss_history"]], rel=1e-6
    )
    assert resumed["result"]["metrics"]["eval_loss"] == pytest.approx(
        straight["result"]["metrics"]["eval_loss"], rel=1e-6
    )
    assert resumed["result"]["artifact"]["digest"] == straight["result"]["artifact"]["digest"]


def test_partial_checkpoints_are_ignored(tmp_path, tiny_model_dir):
    from kubetune_trainer.checkpoints import latest_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step-3").mkdir(parents=True)
    (root / "step-3" / "trainer_state.json").write_text("{}")
    (root / "step-9").mkdir()  # killed before its state file was written
    (root / ".step-12.partial").mkdir()
    assert latest_checkpoint(root) == root / "step-3"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("method", ["LORA", "QLORA"])
def test_merged_model_equals_base_plus_adapter(tmp_path, tiny_model_dir, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    spec = {
        "output": {"volume": {"claimName": "out"}, "mergeAdapter": True},
        "lora": {"rank": 4, "alpha": 32, "dropout": 0.0},
    }
    if method == "QLORA":
        spec["quantization"] = {"computeDtype": "float32"}
    code, message, output = train(tmp_path, tiny_model_dir, method=method, spec=spec)
    assert code == 0, message
    ids = torch.tensor([[1, 40, 41, 300, 7, 9, 500, 2]])
    kwargs = {"dtype": torch.float32}
    if method == "QLORA":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = {"": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)
    plain_base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids)
    adapted = PeftModel.from_pretrained(base, output / "model").eval()
    merged = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float32).eval()
    expected, got = _logits(adapted, ids), _logits(merged, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The adapter changed the model, so the comparison above is not trivially true.
    assert (expected - plain_base_logits).abs().max() > 1e-2
    config = json.loads((output / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
