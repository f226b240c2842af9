"""FineTuningConfig: validation, enums, ids and the mapping onto a FineTuningJob."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from kubetune.api import finetuningjob as api
from kubetune.fine_tuning import (
    DatasetFormat,
    FineTuningConfig,
    FineTuningMethod,
    ModelFineTuner,
    get_model_fine_tuner,
)
from kubetune.sdk.backends import ClusterBackend, LocalBackend
from kubetune.sdk.config import cluster_locations, local_locations, new_job_id, slug, to_job


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"text": "example number {i}"}}\n' for i in range(100)))
    return path


def config(data, **kwargs):
    args = dict(
        model_id="meta-llama/Llama-3.2-1B",
        method=FineTuningMethod.LORA,
        dataset_path=str(data),
        dataset_format=DatasetFormat.JSONL,
        output_dir=str(data.parent / "out"),
    )
    args.update(kwargs)
    return FineTuningConfig(**args)


def test_enums_are_str_enums_with_the_original_values():
    assert [m.value for m in FineTuningMethod] == [
        "full",
        "lora",
        "qlora",
        "prefix_tuning",
        "prompt_tuning",
    ]
    assert [f.value for f in DatasetFormat] == ["jsonl", "csv", "text", "huggingface", "custom"]
    assert isinstance(FineTuningMethod.LORA, str) and FineTuningMethod.LORA == "lora"
    assert FineTuningMethod.PREFIX_TUNING.to_api() == api.FineTuningMethod.PREFIX_TUNING
    assert DatasetFormat.HUGGINGFACE.to_api() == api.DatasetFormat.HUGGINGFACE


def test_positional_arguments_and_defaults(data):
    c = FineTuningConfig("gpt2", "full", str(data), "jsonl", "out")
    assert c.method is FineTuningMethod.FULL and c.dataset_format is DatasetFormat.JSONL
    assert (c.epochs, c.batch_size, c.learning_rate, c.warmup_steps) == (3, 4, 2e-5, 0)
    assert (c.save_steps, c.lora_rank, c.lora_alpha, c.lora_dropout) == (500, 8, 16, 0.05)
    assert (c.max_seq_length, c.validation_split, c.seed, c.additional_params) == (512, 0.1, 42, {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": 0}, "learning_rate must be in (0, 1]"),
        ({"learning_rate": 1.5}, "learning_rate must be in (0, 1]"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"epochs": -1}, "epochs must be positive"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be positive"),
        ({"max_steps": 0}, "max_steps must be positive"),
        ({"warmup_steps": -3}, "warmup_steps must be >= 0"),
        ({"validation_split": 0.9}, "validation_split must be in [0, 0.5]"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
        ({"max_seq_length": 4}, "max_seq_length must be at least 8"),
        ({"method": "sft"}, "method must be one of full, lora, qlora"),
        ({"dataset_format": "xml"}, "dataset_format must be one of jsonl, csv"),
        ({"use_4bit": True, "use_8bit": True}, "exclude each other"),
        ({"use_4bit": True, "method": "full"}, "use_4bit/use_8bit quantise the frozen base"),
        ({"additional_params": {"bogus": 1}}, "unknown additional_params bogus"),
        ({"model_id": ""}, "model_id must be a non-empty string"),
    ],
)
def test_bad_values_are_clear_value_errors(data, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(data, **kwargs)


def test_missing_dataset_file(tmp_path):
    with pytest.raises(ValueError, match=r"dataset file .*missing.jsonl does not exist"):
        config(tmp_path / "missing.jsonl")
    # Hub datasets and cluster volumes are not checked locally.
    config(tmp_path / "x", dataset_path="tatsu-lab/alpaca", dataset_format="huggingface")
    config(tmp_path / "x", dataset_path="pvc://datasets/train.jsonl")


def test_mapping_to_the_job_spec(data):
    c = config(
        data,
        epochs=2,
        batch_size=5,
        learning_rate=1e-4,
        warmup_steps=4,
        eval_steps=7,
        save_steps=9,
        gradient_accumulation_steps=2,
        lora_rank=16,
        lora_alpha=32,
        lora_dropout=0.1,
        max_seq_length=256,
        validation_split=0.2,
        seed=7,
        additional_params={
            "fields": {"text": "text"},
            "preprocessing": [{"type": "filter", "condition": "length > 3"}],
            "target_modules": ["q_proj"],
            "gpus": 2,
            "pod_annotations": {"a": "b"},
            "revision": "abc123",
        },
    )
    spec = to_job(c, "job-1", local_locations(c, "job-1")).spec
    assert spec.method == api.FineTuningMethod.LORA
    assert (
        spec.base_model.name == "meta-llama/Llama-3.2-1B" and spec.base_model.revision == "abc123"
    )
    assert spec.lora.rank == 16 and spec.lora.alpha == 32 and spec.lora.dropout == 0.1
    assert spec.lora.target_modules == ["q_proj"] and spec.quantization is None
    hp = spec.hyperparameters
    assert (hp.epochs, hp.batch_size, hp.learning_rate) == (2, 5, 1e-4)
    assert (hp.eval_steps, hp.save_steps, hp.gradient_accumulation_steps) == (7, 9, 2)
    assert hp.max_seq_length == 256 and spec.seed == 7
    # 80 train rows / (5 x 2) = 8 steps per epoch, 16 in all: 4 warmup steps are a quarter.
    assert hp.warmup_ratio == pytest.approx(0.25)
    assert spec.dataset.validation_split == 0.2 and spec.dataset.fields.text == "text"
    assert spec.dataset.preprocessing[0].condition == "length > 3"
    assert spec.resources.gpus == 2 and spec.pod_metadata.annotations == {"a": "b"}


def test_distributed_and_performance_settings(data):
    c = config(
        data,
        additional_params={
            "gpus": 8,
            "nodes": 4,
            "distributed_strategy": "fsdp",
            "packing_strategy": "bfd",
            "attn_implementation": "sdpa",
            "gradient_checkpointing": True,
        },
    )
    spec = to_job(c, "j", local_locations(c, "j")).spec
    assert (spec.resources.gpus, spec.resources.nodes, spec.distributed.strategy) == (8, 4, "fsdp")
    hp = spec.hyperparameters
    assert (hp.packing_strategy, hp.attn_implementation, hp.gradient_checkpointing) == (
        "bfd",
        "sdpa",
        True,
    )


def test_quantisation_flags_make_qlora(data):
    four = to_job(config(data, use_4bit=True), "j", local_locations(config(data), "j")).spec
    assert four.method == api.FineTuningMethod.QLORA and four.quantization.bits == 4
    eight = to_job(config(data, use_8bit=True), "j", local_locations(config(data), "j")).spec
    assert eight.method == api.FineTuningMethod.QLORA and eight.quantization.bits == 8
    qlora = to_job(config(data, method="qlora"), "j", local_locations(config(data), "j")).spec
    assert qlora.quantization.bits == 4 and qlora.lora.rank == 8


def test_warmup_steps_with_max_steps_and_zero(data):
    c = config(data, max_steps=40, warmup_steps=4)
    assert to_job(c, "j", local_locations(c, "j")).spec.hyperparameters.warmup_ratio == 0.1
    c = config(data)
    assert to_job(c, "j", local_locations(c, "j")).spec.hyperparameters.warmup_ratio == 0.0
    c = config(data, dataset_path="pvc://d/x.jsonl", output_dir="pvc://m/out", warmup_steps=3)
    with pytest.raises(ValueError, match="warmup_steps needs the planned number of steps"):
        to_job(c, "j", cluster_locations(c, "j"))


def test_prompt_tuning_and_hub_dataset(tmp_path):
    c = FineTuningConfig(
        "gpt2",
        "prompt_tuning",
        "tatsu-lab/alpaca",
        "huggingface",
        "pvc://models/out",
        additional_params={"dataset_split": "train[:100]", "num_virtual_tokens": 8},
    )
    spec = to_job(c, "j", cluster_locations(c, "j")).spec
    assert spec.method == api.FineTuningMethod.PROMPT_TUNING
    assert spec.prompt_tuning.num_virtual_tokens == 8 and spec.lora is None
    assert spec.dataset.hugging_face.name == "tatsu-lab/alpaca"
    assert spec.dataset.hugging_face.split == "train[:100]"
    assert spec.output.volume.claim_name == "models" and spec.output.volume.path == "out/j"


def test_cluster_paths_are_volumes(data):
    c = config(data, dataset_path="pvc://datasets/a/train.jsonl", output_dir="pvc://models")
    locations = cluster_locations(c, "job-x")
    assert locations.dataset == api.VolumeLocation(claim_name="datasets", path="a/train.jsonl")
    assert locations.output == api.VolumeLocation(claim_name="models", path="job-x")
    with pytest.raises(ValueError, match="must name a volume on the cluster: pvc://CLAIM/PATH"):
        cluster_locations(config(data), "j")
    with pytest.raises(ValueError, match="is a cluster volume: use the cluster backend"):
        local_locations(c, "j")


def test_job_ids_are_unique_dns_labels():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ids = {new_job_id("meta-llama/Llama-3.2-1B-Instruct_v2", now) for _ in range(200)}
    assert len(ids) == 200
    for job_id in ids:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job_id) and len(job_id) <= 45
        assert job_id.startswith("ft-meta-llama-llama-3-2-260102030405-")
    assert slug("///") == "model" and slug("Org/Model.V1") == "org-model-v1"


def test_backend_selection(no_kubeconfig, tmp_path):
    assert isinstance(ModelFineTuner().backend, LocalBackend)
    assert isinstance(get_model_fine_tuner(), ModelFineTuner)
    with pytest.raises(ValueError, match="backend must be 'local' or 'cluster'"):
        ModelFineTuner(backend="moon")
    from kubetune.sdk.cluster import NoKubeconfig

    with pytest.raises(NoKubeconfig, match="no kubeconfig: set KUBECONFIG or pass --kubeconfig"):
        ModelFineTuner(backend="cluster")
    kubeconfig = tmp_path / "home" / ".kube" / "config"
    kubeconfig.parent.mkdir(parents=True)
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: https://127.0.0.1:1}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u, namespace: team-a}}]\n"
        "current-context: x\n"
    )
    tuner = ModelFineTuner()
    assert isinstance(tuner.backend, ClusterBackend) and tuner.backend.namespace == "team-a"
    assert ModelFineTuner(backend="cluster", namespace="b").backend.namespace == "b"
