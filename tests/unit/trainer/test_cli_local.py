"""`kubetune train -f job.yaml --local`: the example trains end to end; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from kubetune.cli import main
from kubetune.local import build_local_run, load_manifest

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "local"


def models_volume(tmp_path, tiny_model_dir) -> Path:
    volume = tmp_path / "models"
    volume.mkdir()
    (volume / "tiny-llama").symlink_to(tiny_model_dir, target_is_directory=True)
    return volume


def test_example_trains_locally(tmp_path, tiny_model_dir):
    volume = models_volume(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(
        main,
        [
            "train",
            "-f",
            str(EXAMPLE / "job.yaml"),
            "--local",
            "--volume",
            f"models={volume}",
            "--volume",
            f"data={EXAMPLE / 'data'}",
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"model: {tmp_path / 'out' / 'model'} (sha256:" in result.output
    assert (tmp_path / "out" / "model" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_initial"]
    report = json.loads((tmp_path / "out" / "local-report.json").read_text())
    assert report["validation"]["rowsRead"] == 49 and report["validation"]["rowsKept"] == 48
    assert report["progress"]["step"] == report["progress"]["totalSteps"]


def test_validate_only(tmp_path, tiny_model_dir):
    volume = models_volume(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(
        main,
        [
            "train",
            "-f",
            str(EXAMPLE / "job.yaml"),
            "--local",
            "--validate-only",
            "--volume",
            f"models={volume}",
            "--volume",
            f"data={EXAMPLE / 'data'}",
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "dataset ok: 48/49 rows, 42 train, 6 eval" in result.output
    assert "filter 'length > 10': 49 in, kept 48, dropped 1" in result.output
    assert not (tmp_path / "out" / "model").exists()


def test_trainer_errors_are_reported_without_traceback(tmp_path, tiny_model_dir):
    volume = models_volume(tmp_path, tiny_model_dir)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"question": "Q: x?", "answer": 3}\n')
    result = CliRunner().invoke(
        main,
        [
            "train",
            "-f",
            str(EXAMPLE / "job.yaml"),
            "--local",
            "--volume",
            f"models={volume}",
            "--volume",
            f"data={data}",
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1
    assert "InvalidDataset: train.jsonl line 1: field 'answer' must be a string" in result.output
    assert "Traceback" not in result.output


def test_bad_manifest_lists_fields(tmp_path):
    manifest = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    manifest["spec"]["method"] = "LORAX"
    del manifest["spec"]["output"]
    manifest["spec"]["hyperparameters"]["epochs"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = CliRunner().invoke(main, ["train", "-f", str(path), "--local"])
    assert result.exit_code == 1
    assert "is not a valid FineTuningJob" in result.output
    assert "spec.method: Input should be 'FULL', 'LORA'" in result.output
    assert "spec.output: Field required" in result.output
    assert "spec.hyperparameters.epochs" in result.output
    assert "Traceback" not in result.output


def test_missing_volume_folder_says_how_to_map_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "-f", str(EXAMPLE / "job.yaml"), "--local"])
    assert result.exit_code == 1
    assert "base model models/tiny-llama does not exist" in result.output
    assert "--volume models=DIR" in result.output


def test_local_config_resolves_for_this_machine(tmp_path, tiny_model_dir):
    volume = models_volume(tmp_path, tiny_model_dir)
    job = load_manifest(EXAMPLE / "job.yaml")
    run = build_local_run(job, {"models": volume, "data": EXAMPLE / "data"}, gpus=0)
    config = run.config
    assert config.paths.base_model == str((volume / "tiny-llama").resolve())
    assert config.paths.dataset == str((EXAMPLE / "data" / "train.jsonl").resolve())
    assert config.paths.output == str((volume / "out" / "local-lora").resolve())
    assert config.hyperparameters.precision.value == "fp32"  # no GPU here
    assert config.hyperparameters.batch_size == 4 and config.hyperparameters.epochs == 2
    assert config.report.file == str(run.output / "local-report.json")
