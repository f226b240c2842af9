"""The RegisteredModel recorded when a FineTuningJob succeeds (pure)."""

from __future__ import annotations

from datetime import datetime

from kubetune.api import registeredmodel as rm
from kubetune.api.common import VolumeLocation
from kubetune.api.finetuningjob import (
    BaseModelSource,
    FineTuningJobSpec,
    FineTuningJobStatus,
    FineTuningMethod,
)
from kubetune.api.trainer import ResultReport
from kubetune_operator import conditions as c
from kubetune_operator import naming
from kubetune_operator.builders import mounted_path

MAX_NAME = 253


def registered_model_name(body: dict, spec: FineTuningJobSpec) -> str:
    """Deterministic: the same job always registers under the same name."""
    base = spec.registration.model_name or body["metadata"]["name"]
    if spec.registration.suffix:
        base = f"{base}-{spec.registration.suffix}"
    return base[:MAX_NAME]


def serving_hints(
    base_model: BaseModelSource, method: FineTuningMethod, name: str, artifact: rm.Artifact
) -> rm.ServingHints:
    model_dir = mounted_path(artifact.volume)
    base = mounted_path(base_model.volume) if base_model.volume else base_model.name
    revision = (
        f" --revision {base_model.revision}"
        if base_model.revision and not base_model.volume
        else ""
    )
    uri = f"pvc://{artifact.volume.claim_name}/{artifact.volume.path}".rstrip("/")
    if artifact.kind == rm.ArtifactKind.ADAPTER and method in (
        FineTuningMethod.LORA,
        FineTuningMethod.QLORA,
    ):
        vllm = f"vllm serve {base}{revision} --enable-lora --lora-modules {name}={model_dir}"
        loader = (
            "from peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({model_dir!r})"
        )
    elif artifact.kind == rm.ArtifactKind.ADAPTER:
        vllm = "vLLM does not serve prefix or prompt-tuning adapters: load them with transformers + peft"
        loader = (
            "from peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({model_dir!r})"
        )
    else:
        vllm = f"vllm serve {model_dir} --served-model-name {name}"
        loader = (
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({model_dir!r})"
        )
    kserve = (
        "apiVersion: serving.kserve.io/v1beta1\n"
        "kind: InferenceService\n"
        f"metadata:\n  name: {name[:63]}\n"
        "spec:\n  predictor:\n    model:\n      modelFormat:\n        name: huggingface\n"
        f"      storageUri: {uri}\n"
    )
    return rm.ServingHints(vllm=vllm, kserve=kserve, transformers=loader)


def desired_registered_model(
    body: dict,
    spec: FineTuningJobSpec,
    status: FineTuningJobStatus,
    result: ResultReport,
    trained_at: datetime,
) -> dict:
    """The RegisteredModel for a succeeded job. Not owned by the job: it outlives it."""
    meta = body["metadata"]
    name = registered_model_name(body, spec)

    def under_output(path: str) -> VolumeLocation:
        """The trainer reports paths relative to the job's own folder of the output."""
        return spec.output.job_location(meta["name"], meta["uid"], path)

    artifact = rm.Artifact(
        volume=under_output(result.artifact.path),
        kind=result.artifact.kind,
        digest=result.artifact.digest,
        merged_volume=under_output(result.artifact.merged_path)
        if result.artifact.merged_path
        else None,
    )
    adapter = rm.AdapterSettings(
        lora=(spec.lora or rm.LoraSettings())
        if spec.method in (FineTuningMethod.LORA, FineTuningMethod.QLORA)
        else None,
        quantization=(spec.quantization or rm.QuantizationSettings())
        if spec.method == FineTuningMethod.QLORA
        else None,
        virtual_tokens=(
            spec.prefix_tuning or spec.prompt_tuning or rm.VirtualTokenSettings()
            if spec.method in (FineTuningMethod.PREFIX_TUNING, FineTuningMethod.PROMPT_TUNING)
            else None
        ),
    )
    model_spec = rm.RegisteredModelSpec(
        base_model=spec.base_model,
        method=spec.method,
        adapter=adapter,
        artifact=artifact,
        dataset=rm.DatasetLineage(
            format=spec.dataset.format,
            volume=spec.dataset.volume,
            hugging_face=spec.dataset.hugging_face,
            custom=spec.dataset.custom,
            digest=result.dataset_digest or status.dataset_digest or "",
            preprocessing_steps=len(spec.dataset.preprocessing),
        ),
        hyperparameters=status.hyperparameters,
        seed=spec.seed,
        metrics=dict(status.metrics or result.metrics),
        evaluation=status.evaluation,
        source_job=rm.SourceJob(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=meta.get("generation", 1),
        ),
        trainer_image=status.trainer_image or "",
        trained_at=trained_at,
        serving=serving_hints(spec.base_model, spec.method, name, artifact),
    )
    labels = {
        naming.LABEL_NAME: "kubetune",
        naming.LABEL_PART_OF: "kubetune",
        naming.LABEL_MANAGED_BY: naming.MANAGER,
        naming.LABEL_JOB_NAME: naming.label_value(meta["name"]),
        naming.LABEL_JOB_UID: meta["uid"],
        "kubetune.dev/method": spec.method.value.lower().replace("_", "-"),
    }
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": rm.KIND,
        "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels},
        "spec": model_spec.to_api(),
    }


def registration_conditions(
    status: FineTuningJobStatus,
    conds: c.Conditions,
    spec: FineTuningJobSpec,
    model: dict | None,
    uid: str,
) -> None:
    """The Registered condition: whether the name is free before training, and whether
    the RegisteredModel that holds it records this job's model after."""
    if not conds.is_true(c.SUCCEEDED):
        # Checked before any GPU is requested: the plan creates no training Job
        # while the name records another job's model.
        if spec.registration.enabled and model is not None and _source_uid(model) != uid:
            conds.set(
                c.REGISTERED,
                False,
                c.NAME_TAKEN,
                f"RegisteredModel {model['metadata']['name']} already records the model of "
                f"{_source_name(model)}: set spec.registration.modelName (or suffix) to a free "
                "name; training starts once the name is free",
            )
        elif conds.reason(c.REGISTERED) == c.NAME_TAKEN:
            conds.set(
                c.REGISTERED, None, c.NAME_FREE, "the model is registered when training succeeds"
            )
        return
    if not spec.registration.enabled:
        conds.set(
            c.REGISTERED, False, c.REGISTRATION_DISABLED, "spec.registration.enabled is false"
        )
        return
    if model is None:
        return
    name = model["metadata"]["name"]
    if _source_uid(model) != uid:
        # Taken while this job trained: nothing is lost, the weights stay where the
        # status says, and registration happens once the name is free.
        artifact = status.artifact.volume if status.artifact else None
        where = f" ({artifact.claim_name}:{artifact.path})" if artifact else ""
        conds.set(
            c.REGISTERED,
            False,
            c.NAME_TAKEN,
            f"RegisteredModel {name} already records the model of {_source_name(model)}: delete "
            f"it (or register this job's weights{where} under another name with the SDK or "
            "CLI); kubetune registers this model as soon as the name is free",
        )
        return
    status.registered_model = name
    conds.set(
        c.REGISTERED, True, c.MODEL_REGISTERED, f"RegisteredModel {name} records the trained model"
    )


def _source_uid(model: dict) -> str | None:
    return ((model.get("spec") or {}).get("sourceJob") or {}).get("uid")


def _source_name(model: dict) -> str:
    spec = model.get("spec") or {}
    if spec.get("merge"):
        source = spec["merge"].get("source") or {}
        return f"ModelMerge {source.get('name', '?')} (uid {source.get('uid', '?')})"
    source = spec.get("sourceJob") or {}
    return f"FineTuningJob {source.get('name', '?')} (uid {source.get('uid', '?')})"
