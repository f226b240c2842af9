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
    # Observers hear of every logged step (and the last one), after the trainer's own
    # report for that step.
    assert seen == [4, 8, 12, 14]


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
    # The step under way when SIGTERM came (7) is finished and saved.
    saved = sorted(p.name for p in (output / "checkpoints").iterdir() if p.is_dir())
    assert saved == ["checkpoint-4", "checkpoint-7"]
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


def test_resumes_only_complete_checkpoints_of_its_own_job(tmp_path):
    from kubetune_trainer.checkpoints import resumable_checkpoint, write_marker
    from kubetune_trainer.errors import InvalidConfig

    from kubetune.api.trainer import JobIdentity

    job = JobIdentity(name="a", namespace="ns", uid="u1")
    root = tmp_path / "checkpoints"
    for step in (3, 9, 12):
        (root / f"checkpoint-{step}").mkdir(parents=True)
    write_marker(root / "checkpoint-3", job, 3)
    write_marker(root / "checkpoint-9", job, 9)
    # checkpoint-12 has no marker: the run was killed while saving it.
    assert resumable_checkpoint(root, job) == root / "checkpoint-9"
    assert resumable_checkpoint(tmp_path / "none", job) is None
    # The same name recreated is another job: its files are never loaded.
    with pytest.raises(InvalidConfig, match="another job"):
        resumable_checkpoint(root, JobIdentity(name="a", namespace="ns", uid="u2"))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize(("method", "bits"), [("LORA", None), ("QLORA", 4), ("QLORA", 8)])
def test_merged_model_equals_base_plus_adapter(tmp_path, tiny_model_dir, method, bits):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    spec = {
        "output": {"volume": {"claimName": "out"}, "mergeAdapter": True},
        "lora": {"rank": 4, "alpha": 32, "dropout": 0.0},
    }
    if method == "QLORA":
        spec["quantization"] = {"bits": bits}  # computeDtype auto: fp32 like the training
    code, message, output = train(tmp_path, tiny_model_dir, method=method, spec=spec)
    assert code == 0, message
    ids = torch.tensor([[1, 40, 41, 300, 7, 9, 500, 2]])
    kwargs = {"dtype": torch.float32}
    if bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    if bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if bits:
        kwargs["device_map"] = {"": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)
    plain_base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids)
    adapted = PeftModel.from_pretrained(base, output / "model").eval()
    merged = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float32).eval()
    expected, got = _logits(adapted, ids), _logits(merged, ids)
    # The 4-bit kernel dequantises and multiplies in another order than a plain matmul.
    tolerance = 5e-4 if bits else 1e-4
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=1e-4)
    # The adapter changed the model, so the comparison above is not trivially true.
    assert (expected - plain_base_logits).abs().max() > 1e-2
    config = json.loads((output / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


def test_train_loss_is_the_mean_over_every_step(tmp_path, tiny_model_dir):
    from kubetune_trainer.recipe import mean_logged_loss

    # Each logged loss is the mean since the previous log.
    history = [{"loss": 4.0, "step": 4}, {"eval_loss": 9.0, "step": 4}, {"loss": 2.0, "step": 10}]
    assert mean_logged_loss(history) == pytest.approx((4 * 4.0 + 6 * 2.0) / 10)
    code, every_step, output = train(tmp_path, tiny_model_dir, name="every")
    assert code == 0
    losses = [loss for _, loss in json.loads((output / "metrics.json").read_text())["loss_history"]]
    assert len(losses) == 14
    mean = sum(losses) / len(losses)
    assert every_step["result"]["metrics"]["train_loss"] == pytest.approx(mean, rel=1e-6)
    assert every_step["result"]["metrics"]["train_loss"] != pytest.approx(losses[-1], rel=1e-3)
    code, sparse, _ = train(
        tmp_path, tiny_model_dir, name="sparse", hyperparameters={"loggingSteps": 4}
    )
    assert code == 0
    assert sparse["result"]["metrics"]["train_loss"] == pytest.approx(mean, rel=1e-5)


def test_tokens_per_second_leave_out_evaluation(tmp_path, tiny_model_dir):
    import time

    started = time.monotonic()
    code, message, output = train(tmp_path, tiny_model_dir, hyperparameters={"evalSteps": 1})
    wall = time.monotonic() - started
    assert code == 0
    metrics = message["result"]["metrics"]
    state = json.loads(
        (output / "checkpoints" / "checkpoint-14" / "trainer_state.json").read_text()
    )
    eval_seconds = sum(e["eval_runtime"] for e in state["log_history"] if "eval_runtime" in e)
    assert len([e for e in state["log_history"] if "eval_runtime" in e]) == 15  # and on start
    assert metrics["train_runtime_seconds"] + eval_seconds < wall
    tokens = max(e.get("num_tokens", 0) for e in state["log_history"])
    assert metrics["train_tokens_per_second"] == pytest.approx(
        tokens / metrics["train_runtime_seconds"], rel=1e-6
    )


def test_a_tampered_checkpoint_is_never_unpickled(tmp_path, tiny_model_dir):
    """Whoever can write the output volume cannot run code in the trainer: every file
    of a checkpoint is read as safetensors or with torch.load(weights_only=True)."""
    settings = {"hyperparameters": {"saveSteps": 4}}

    def preempt(step):
        if step.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    code, _, output = train(tmp_path, tiny_model_dir, callbacks=[preempt], **settings)
    assert code == EXIT_INTERRUPTED
    proof = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(proof), "w"))

    import pickle

    for name in ("rng_state.pth", "optimizer.pt", "scheduler.pt"):
        (output / "checkpoints" / "checkpoint-6" / name).write_bytes(pickle.dumps(Payload()))
    code, message, _ = train(tmp_path, tiny_model_dir, **settings)
    assert code != 0
    assert (
        "Weights only load failed" in message["error"]["message"]
        or "UnpicklingError" in (message["error"]["message"])
    )
    assert not proof.exists()


def test_the_gradient_scaler_resumes_with_its_scale(tmp_path, tiny_model_dir, tokenizer):
    """fp16 training scales the loss; a resumed run continues with the scale it had, not
    the initial one (CPUs train fp16 without a scaler, so one is put in by hand here)."""
    from kubetune_trainer.training import build_trainer, sft_arguments
    from transformers import AutoModelForCausalLM, TrainerCallback

    from kubetune.api.finetuningjob import ResolvedHyperparameters

    from .helpers import DEFAULT_HYPERPARAMETERS
    from .test_collation import make_examples

    class FirstScale(TrainerCallback):
        seen = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.seen is None:
                self.seen = trainer.accelerator.scaler.get_scale()

    def run(resume=None):
        nonlocal trainer
        hp = ResolvedHyperparameters.model_validate(
            {
                **DEFAULT_HYPERPARAMETERS,
                "maxSteps": 4,
                "saveSteps": 2,
                "gradientAccumulationSteps": 1,
            }
        )
        args = sft_arguments(
            hp,
            output_dir=tmp_path / "ck",
            on_cpu=True,
            has_eval=False,
            collective_timeout_seconds=60,
            fsdp={},
        )
        probe = FirstScale()
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        trainer = build_trainer(
            model,
            tokenizer,
            args,
            train=make_examples([9] * 16),
            evaluation=[],
            callbacks=[probe],
            keep_fp32_adapters=True,
        )
        trainer.accelerator.scaler = torch.amp.GradScaler(
            "cpu", init_scale=2.0**10, growth_interval=1
        )
        trainer.train(resume_from_checkpoint=resume)
        return probe.seen

    trainer = None
    assert run() == 2.0**10
    saved = torch.load(tmp_path / "ck" / "checkpoint-2" / "scaler.pt", weights_only=True)
    assert saved["scale"] == 2.0**12  # grew after each of the two steps
    assert run(resume=str(tmp_path / "ck" / "checkpoint-2")) == 2.0**12
