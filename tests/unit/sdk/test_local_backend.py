"""The local backend end to end on a tiny model: create, wait, register, cancel; and
prepare_dataset through the trainer's pipeline."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kubetune.fine_tuning import DatasetFormat, FineTuningConfig, FineTuningMethod, ModelFineTuner

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "examples" / "local" / "data" / "train.jsonl"


def run(coro):
    return asyncio.run(coro)


def tiny_config(model_dir: Path, output: Path, **kwargs) -> FineTuningConfig:
    args = dict(
        epochs=1,
        batch_size=4,
        learning_rate=2e-2,
        max_seq_length=64,
        validation_split=0.125,
        save_steps=100,
        additional_params={"fields": {"prompt": "question", "completion": "answer"}},
    )
    args.update(kwargs)
    return FineTuningConfig(
        str(model_dir), FineTuningMethod.LORA, str(DATA), DatasetFormat.JSONL, str(output), **args
    )


class Models:
    def __init__(self, known: set[str]):
        self.known = known

    async def get_model(self, model_id: str):
        return {"id": model_id} if model_id in self.known else None


def test_train_wait_register(tmp_path, tiny_model_dir):
    async def scenario():
        tuner = ModelFineTuner(Models({str(tiny_model_dir)}), backend="local")
        config = tiny_config(tiny_model_dir, tmp_path / "out")
        first = await tuner.create_fine_tuning_job(config)
        assert tuner.jobs[first].status == "created"
        second = await tuner.create_fine_tuning_job(tiny_config(tiny_model_dir, tmp_path / "out"))
        assert first != second  # same model, same second: two jobs
        assert await tuner.cancel_fine_tuning_job(second)
        with pytest.raises(ValueError, match=r"is (running|created), not completed"):
            await tuner.register_fine_tuned_model(first)
        result = await tuner.wait_for_completion(first, timeout=300)
        assert result.status == "completed", result.error
        assert result.metrics["steps"] == result.step == result.total_steps > 0
        assert result.loss is not None and result.end_time >= result.start_time
        model_id = await tuner.register_fine_tuned_model(first)
        assert await tuner.register_fine_tuned_model(first) == model_id == first
        record = json.loads((tmp_path / "out" / first / "registered-model.json").read_text())
        assert record["id"] == model_id and record["artifact"]["kind"] == "adapter"
        assert Path(record["artifact"]["path"], "adapter_model.safetensors").is_file()
        assert (await tuner.get_fine_tuning_job(first)).fine_tuned_model_id == model_id
        assert [r.job_id for r in await tuner.list_fine_tuning_jobs(status="completed")] == [first]
        assert len(await tuner.list_fine_tuning_jobs(model_id=str(tiny_model_dir))) == 2
        assert await tuner.list_fine_tuning_jobs(model_id="other") == []
        assert await tuner.get_fine_tuning_job("nope") is None

    run(scenario())


def test_cancel_stops_the_trainer_and_stays_cancelled(tmp_path, tiny_model_dir):
    async def scenario():
        tuner = ModelFineTuner(backend="local")
        job_id = await tuner.create_fine_tuning_job(
            tiny_config(tiny_model_dir, tmp_path / "out", epochs=500)
        )
        process = tuner.backend.jobs[job_id].process
        assert process.poll() is None
        assert await tuner.cancel_fine_tuning_job(job_id)
        assert process.poll() is not None  # the trainer process has exited
        result = await tuner.wait_for_completion(job_id, timeout=10)
        assert result.status == "cancelled"
        assert (await tuner.get_fine_tuning_job(job_id)).status == "cancelled"
        assert not (tmp_path / "out" / job_id / "model").exists()
        with pytest.raises(ValueError, match="is cancelled, not completed"):
            await tuner.register_fine_tuned_model(job_id)

    run(scenario())


def test_unknown_base_model_and_model_ids_with_slashes(tmp_path):
    async def scenario():
        data = tmp_path / "d.jsonl"
        data.write_text('{"text": "hello there"}\n')
        tuner = ModelFineTuner(Models(set()), backend="local")
        config = FineTuningConfig("org/missing", "lora", str(data), "jsonl", str(tmp_path / "o"))
        with pytest.raises(ValueError, match="Model org/missing not found"):
            await tuner.create_fine_tuning_job(config)

    run(scenario())


def test_failure_is_reported(tmp_path, tiny_model_dir):
    async def scenario():
        data = tmp_path / "bad.jsonl"
        data.write_text('{"question": "Q: x?", "answer": 3}\n')
        tuner = ModelFineTuner(backend="local")
        config = tiny_config(tiny_model_dir, tmp_path / "out", validation_split=0.0)
        config.dataset_path = str(data)
        job_id = await tuner.create_fine_tuning_job(config)
        result = await tuner.wait_for_completion(job_id, timeout=300)
        assert result.status == "failed"
        assert "InvalidDataset" in result.error and "must be a string" in result.error

    run(scenario())


def test_prepare_dataset_converts_and_preprocesses(tmp_path):
    source = tmp_path / "raw" / "support.csv"
    source.parent.mkdir()
    source.write_text(
        "question,answer\n"
        "  How Do I Reset?  ,Use The Link\n"
        "hi,yo\n"
        "Where Is My Order?,Check Tracking\n"
    )
    steps = [
        {"type": "filter", "condition": "length > 10"},
        {"type": "transform", "operation": "lowercase"},
        {"type": "transform", "operation": "strip"},
    ]
    tuner = ModelFineTuner(backend="local")
    path = run(
        tuner.prepare_dataset(
            source,
            DatasetFormat.CSV,
            preprocessing_steps=steps,
            fields={"prompt": "question", "completion": "answer"},
        )
    )
    assert path == str(tmp_path / "raw" / "prepared" / "support.jsonl")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert rows == [
        {"question": "how do i reset?", "answer": "use the link"},
        {"question": "where is my order?", "answer": "check tracking"},
    ]
    text = run(tuner.prepare_dataset(path, "jsonl", "csv"))
    assert text.endswith("prepared/prepared/support.csv")
    with pytest.raises(ValueError, match="operation 'shout' is not one of"):
        run(
            tuner.prepare_dataset(
                source, "csv", "jsonl", [{"type": "transform", "operation": "shout"}]
            )
        )
    with pytest.raises(ValueError, match="converts jsonl, csv and text files, not huggingface"):
        run(tuner.prepare_dataset(source, "csv", "huggingface"))
