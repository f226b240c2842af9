"""Bad input: each class gives a clear message, its exit code and a termination message."""

from __future__ import annotations

import json

import pytest
from kubetune_trainer.main import main
from kubetune_trainer.reporting import write_termination

from kubetune.api.trainer import (
    TERMINATION_MESSAGE_MAX_BYTES,
    ErrorReport,
    ReportEndpoint,
    TrainerTermination,
)

from .helpers import make_config, qa_rows, write_config, write_jsonl


def run_main(tmp_path, config, mode="train"):
    config_file = write_config(config, tmp_path / "config.json")
    termination = tmp_path / "termination-log"
    code = main(
        ["--config", str(config_file), "--mode", mode, "--termination-log", str(termination)]
    )
    return code, json.loads(termination.read_text())


def dataset_with(tmp_path, lines):
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps(qa_rows(1)[0])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, GOOD, '{"question": "Q", "answer": '], "train.jsonl line 3: not valid JSON"),
        ([GOOD, json.dumps({"question": "Q: x"})], "train.jsonl line 2: missing field 'answer'"),
        (
            [GOOD, json.dumps({"question": "Q", "answer": 42})],
            "train.jsonl line 2: field 'answer' must be a string, got a number",
        ),
        ([GOOD, "[1]"], "train.jsonl line 2: each line must be a JSON object"),
    ],
)
def test_invalid_rows_exit_65_naming_row_and_field(
    tmp_path, tiny_model_dir, lines, message, capsys
):
    config = make_config(tmp_path, tiny_model_dir, dataset=dataset_with(tmp_path, lines * 1))
    code, termination = run_main(tmp_path, config)
    assert code == 65
    assert termination["error"]["reason"] == "InvalidDataset"
    assert message in termination["error"]["message"]
    assert "Traceback" not in termination["error"]["message"]
    assert "Traceback" not in capsys.readouterr().err


def test_empty_after_filtering_exits_65(tmp_path, tiny_model_dir):
    config = make_config(
        tmp_path,
        tiny_model_dir,
        dataset_spec={"preprocessing": [{"type": "filter", "condition": "length > 100000"}]},
    )
    code, termination = run_main(tmp_path, config)
    assert code == 65
    assert "no rows left after preprocessing (64 read)" in termination["error"]["message"]
    assert "kept 0, dropped 64" in termination["error"]["message"]


def test_too_long_for_max_seq_length_exits_65(tmp_path, tiny_model_dir):
    rows = qa_rows(4)
    rows[2] = {"question": "Q: " + "what is the capital " * 20, "answer": " paris"}
    config = make_config(
        tmp_path,
        tiny_model_dir,
        dataset=write_jsonl(tmp_path / "d.jsonl", rows),
        dataset_spec={"validationSplit": 0.0},
        hyperparameters={"maxSeqLength": 16},
    )
    code, termination = run_main(tmp_path, config)
    assert code == 65
    assert (
        "d.jsonl line 3: no tokens left to learn from after truncation to maxSeqLength 16"
        in (termination["error"]["message"])
    )


def test_plain_text_longer_than_max_seq_length_is_truncated_and_counted(tmp_path, tiny_model_dir):
    rows = [{"text": "the cat eats the fish " * (1 + 10 * (i % 2))} for i in range(8)]
    config = make_config(
        tmp_path,
        tiny_model_dir,
        dataset=write_jsonl(tmp_path / "d.jsonl", rows),
        dataset_spec={"fields": {}},
        hyperparameters={"maxSeqLength": 16},
    )
    code, termination = run_main(tmp_path, config, mode="validate")
    assert code == 0
    assert "truncated to maxSeqLength 16: 4 of 8 rows" in termination["validation"]["steps"]


def test_missing_dataset_exits_66(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, dataset=tmp_path / "nope.jsonl")
    code, termination = run_main(tmp_path, config)
    assert code == 66
    assert termination["error"]["reason"] == "InputNotFound"
    assert "nope.jsonl does not exist" in termination["error"]["message"]


def test_missing_model_exits_66(tmp_path):
    config = make_config(tmp_path, tmp_path / "no-model")
    code, termination = run_main(tmp_path, config)
    assert code == 66
    assert "base model folder" in termination["error"]["message"]


def test_bad_filter_exits_64_pointing_at_the_column(tmp_path, tiny_model_dir):
    config = make_config(
        tmp_path,
        tiny_model_dir,
        dataset_spec={
            "preprocessing": [{"type": "filter", "condition": "length > 10 and exec('x')"}]
        },
    )
    code, termination = run_main(tmp_path, config)
    assert code == 64
    assert termination["error"]["reason"] == "InvalidConfig"
    assert "at column 21" in termination["error"]["message"]


def test_unreadable_config_exits_64_and_missing_config_66(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"job": {"name": "x"}, "spec": {}}))
    termination = tmp_path / "t"
    assert main(["--config", str(bad), "--termination-log", str(termination)]) == 64
    message = json.loads(termination.read_text())["error"]["message"]
    assert "spec.baseModel: Field required" in message
    assert (
        main(["--config", str(tmp_path / "none.json"), "--termination-log", str(termination)]) == 66
    )


def test_validate_mode_reports_without_training(tmp_path, tiny_model_dir):
    config = make_config(
        tmp_path,
        tiny_model_dir,
        dataset_spec={
            "preprocessing": [{"type": "filter", "condition": "not answer contains 'paris'"}]
        },
    )
    code, termination = run_main(tmp_path, config, mode="validate")
    assert code == 0
    validation = termination["validation"]
    assert validation["rowsRead"] == 64 and validation["rowsKept"] == 56
    assert validation["trainRows"] + validation["evalRows"] == 56
    assert validation["evalRows"] == 7
    assert validation["tokens"] > 0
    assert validation["digest"].startswith("sha256:") and len(validation["digest"]) == 71
    assert validation["steps"][0].startswith(
        "filter \"not answer contains 'paris'\": 64 in, kept 56"
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["validation"] == validation
    assert not (tmp_path / "out" / "model").exists()
    # Same inputs, same digest; different rows, different digest.
    _, again = run_main(tmp_path, config, mode="validate")
    assert again["validation"]["digest"] == validation["digest"]
    other = make_config(tmp_path, tiny_model_dir)
    _, different = run_main(tmp_path, other, mode="validate")
    assert different["validation"]["digest"] != validation["digest"]


def test_report_failures_do_not_stop_training(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, hyperparameters={"maxSteps": 2})
    # Nobody listens at the endpoint: reports fail, training goes on.
    token = tmp_path / "token"
    token.write_text("a-token")
    config.report.endpoint = ReportEndpoint(url="https://127.0.0.1:9", token_file=str(token))
    code, termination = run_main(tmp_path, config)
    assert code == 0
    assert termination["result"]["metrics"]["steps"] == 2


def test_termination_message_fits_the_kubelet_limit(tmp_path):
    path = tmp_path / "t"
    write_termination(
        TrainerTermination(error=ErrorReport(reason="InvalidDataset", message="x" * 20000)), path
    )
    document = path.read_bytes()
    assert len(document) <= TERMINATION_MESSAGE_MAX_BYTES
    assert json.loads(document)["error"]["reason"] == "InvalidDataset"
