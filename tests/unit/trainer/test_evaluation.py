"""spec.evaluation in the trainer: metrics for both models, the report file, the model
card, errors refused before training, and a failed evaluation that keeps the model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from kubetune_trainer import evaluation as evaluation_module
from kubetune_trainer.encoding import Example

from .helpers import write_jsonl
from .test_training import train

EVALUATION = {
    "metrics": ["loss", "perplexity", "token_accuracy", "exact_match", "contains", "rouge_l"],
    "generation": {"maxNewTokens": 3},
}
LEARN = {"epochs": 3, "learningRate": 2e-2}
# Full fine-tuning learns the eight fixed answers of the tiny task by heart.
LEARN_BY_HEART = {"epochs": 5, "learningRate": 3e-3}


def test_both_models_are_measured_and_the_tuned_one_is_better(tmp_path, tiny_model_dir):
    code, message, output = train(
        tmp_path,
        tiny_model_dir,
        method="FULL",
        spec={"evaluation": EVALUATION},
        hyperparameters=LEARN_BY_HEART,
    )
    assert code == 0, message
    result = message["result"]
    evaluation = result["evaluation"]
    assert evaluation["examples"] == 8  # the validation split
    assert evaluation["datasetDigest"].startswith("sha256:")
    metrics = evaluation["metrics"]
    assert set(metrics) == set(EVALUATION["metrics"])
    assert metrics["loss"]["tuned"] < metrics["loss"]["base"] - 1.0
    assert metrics["perplexity"]["tuned"] == pytest.approx(
        torch.exp(torch.tensor(metrics["loss"]["tuned"])).item(), rel=1e-5
    )
    assert metrics["token_accuracy"]["tuned"] > metrics["token_accuracy"]["base"]
    # The tiny task (eight fixed answers) is learnt: the answers come out verbatim.
    assert metrics["contains"]["tuned"] >= 0.75 > metrics["contains"]["base"]
    assert result["evaluationReportPath"] == "evaluation.jsonl"

    rows = [json.loads(line) for line in (output / "evaluation.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert set(rows[0]) == {
        "index",
        "prompt",
        "reference",
        "base_output",
        "tuned_output",
        "base_scores",
        "tuned_scores",
    }
    assert rows[0]["prompt"].startswith("Q: what is the ")
    assert set(rows[0]["tuned_scores"]) == {
        "loss",
        "token_accuracy",
        "exact_match",
        "contains",
        "rouge_l",
    }
    # The totals are the report's rows summed up (loss: per label token, so not a plain mean).
    contains = [r["tuned_scores"]["contains"] for r in rows]
    assert metrics["contains"]["tuned"] == pytest.approx(sum(contains) / len(contains))

    card = (output / "model" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert (
        front["kubetune"]["evaluation"]["metrics"]["contains"]["tuned"]
        == metrics["contains"]["tuned"]
    )
    assert "| contains |" in card and "## Evaluation" in card


def test_evaluation_data_from_its_own_file_and_no_base(tmp_path, tiny_model_dir):
    rows = [
        {"q": "Q: what is the capital of italy?\nA:", "a": " rome"},
        {"q": "Q: what is the color of the sea?\nA:", "a": " blue"},
    ]
    held_out = write_jsonl(tmp_path / "eval" / "held-out.jsonl", rows)
    config_spec = {
        "evaluation": {
            "data": {
                "format": "JSONL",
                "volume": {"claimName": "eval", "path": "held-out.jsonl"},
                "fields": {"prompt": "q", "completion": "a"},
            },
            "metrics": ["contains", "regex"],
            "regex": r"^\s*[a-z]+",
            "compareBase": False,
            "generation": {"maxNewTokens": 3},
        }
    }
    code, message, output = train(
        tmp_path,
        tiny_model_dir,
        spec=config_spec,
        hyperparameters=LEARN,
        evaluation_path=held_out,
    )
    assert code == 0, message
    evaluation = message["result"]["evaluation"]
    assert evaluation["examples"] == 2
    assert set(evaluation["metrics"]) == {"contains", "regex"}
    assert all("base" not in value for value in evaluation["metrics"].values())
    report = [json.loads(line) for line in (output / "evaluation.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in report] == [" rome", " blue"]
    assert report[0]["base_output"] is None


@pytest.mark.parametrize(
    ("evaluation", "exit_code", "words"),
    [
        # Plain-text rows have no reference to compare generated text with.
        (
            {"metrics": ["contains"]},
            64,
            "spec.evaluation.metrics: contains compare generated text to a reference",
        ),
        (
            {"metrics": ["regex"], "regex": "(unclosed"},
            64,
            "spec.evaluation.regex:",
        ),
        (
            {
                "data": {"format": "JSONL", "volume": {"claimName": "eval", "path": "nope.jsonl"}},
            },
            66,
            "spec.evaluation.data: the file",
        ),
    ],
)
def test_a_bad_evaluation_fails_in_the_validation_pod(
    tmp_path, tiny_model_dir, evaluation, exit_code, words
):
    text_rows = write_jsonl(
        tmp_path / "data" / "text.jsonl", [{"text": f"row {i} says hello"} for i in range(16)]
    )
    dataset = (
        {"dataset_spec": {"fields": {"text": "text"}}, "dataset": text_rows}
        if "data" not in evaluation and evaluation["metrics"] == ["contains"]
        else {}
    )
    code, message, _ = train(
        tmp_path,
        tiny_model_dir,
        mode="validate",
        spec={"evaluation": evaluation},
        evaluation_path=tmp_path / "eval" / "nope.jsonl",
        **dataset,
    )
    assert code == exit_code, message
    assert words in message["error"]["message"]


def test_a_failing_evaluation_keeps_the_trained_model(tmp_path, tiny_model_dir, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("out of memory while generating")

    monkeypatch.setattr(evaluation_module, "score_model", broken)
    code, message, output = train(
        tmp_path, tiny_model_dir, spec={"evaluation": EVALUATION}, hyperparameters=LEARN
    )
    assert code == 0, message
    result = message["result"]
    assert (output / "model" / "adapter_model.safetensors").is_file()
    assert result["artifact"]["kind"] == "adapter"
    assert "out of memory while generating" in result["evaluation"]["error"]
    assert "was saved and registered" in result["evaluation"]["error"]
    assert "evaluationReportPath" not in result
    assert "evaluation failed" in (output / "model" / "README.md").read_text()


def test_loss_and_accuracy_match_the_library_loss(tiny_model_dir):
    """Our per-token loss over a batch equals transformers' own loss on each example."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    examples = []
    for length, prompt in ((9, 4), (6, 2), (12, 7)):
        ids = torch.randint(5, 200, (length,)).tolist()
        examples.append(Example(ids, [-100] * prompt + ids[prompt:]))
    rows = [{} for _ in examples]
    loss, accuracy = evaluation_module._teacher_forced(model, tokenizer, examples, rows)
    with torch.no_grad():
        expected = []
        for example in examples:
            out = model(
                input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])
            )
            expected.append((out.loss.item(), example.label_tokens))
    assert [r["loss"] for r in rows] == pytest.approx([e[0] for e in expected], rel=1e-5)
    total = sum(value * count for value, count in expected) / sum(c for _, c in expected)
    assert loss == pytest.approx(total, rel=1e-5)
    assert 0.0 <= accuracy <= 1.0


def test_evaluation_data_from_a_hugging_face_dataset(tmp_path, tiny_model_dir):
    """The Hub path (datasets.load_dataset), here on a local dataset folder as the Hub
    cache would hold one: offline, nothing is downloaded."""
    rows = [{"question": "Q: what is the capital of japan?\nA:", "answer": " tokyo"}] * 3
    write_jsonl(tmp_path / "hub-dataset" / "test.jsonl", rows)
    evaluation = {
        "data": {
            "format": "HUGGINGFACE",
            "huggingFace": {"name": str(tmp_path / "hub-dataset"), "split": "test"},
        },
        "metrics": ["loss", "contains"],
        "generation": {"maxNewTokens": 3},
    }
    code, message, _ = train(
        tmp_path, tiny_model_dir, spec={"evaluation": evaluation}, hyperparameters=LEARN
    )
    assert code == 0, message
    result = message["result"]["evaluation"]
    assert result["examples"] == 3
    assert result["metrics"]["loss"]["tuned"] < result["metrics"]["loss"]["base"]
