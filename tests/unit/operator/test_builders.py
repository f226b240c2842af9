"""Shapes of the objects the operator creates."""

from __future__ import annotations

import json

from kubetune_operator import builders, naming
from kubetune_operator.settings import OperatorSettings

from kubetune.api.trainer import TrainerConfig, TrainerMode
from tests.unit.operator.conftest import SPEC, make_body, parse

SETTINGS = OperatorSettings(trainer_image="registry.example/trainer:1")


def train_job(body=None, **kwargs):
    body = body or make_body()
    return builders.desired_job(
        body, parse(body), SETTINGS, TrainerMode.TRAIN, suspend=kwargs.get("suspend", False)
    )


def container(job):
    [c] = job["spec"]["template"]["spec"]["containers"]
    return c


def test_train_job_requests_gpus_and_lands_on_the_asked_gpu_type() -> None:
    job = train_job()
    pod = job["spec"]["template"]["spec"]
    resources = container(job)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "2"
    assert resources["limits"]["nvidia.com/gpu"] == "2"
    assert resources["limits"]["memory"] == resources["requests"]["memory"] == "32Gi"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_validation_job_is_cpu_only_and_never_retried() -> None:
    body = make_body()
    job = builders.desired_job(body, parse(body), SETTINGS, TrainerMode.VALIDATE, suspend=False)
    resources = container(job)["resources"]
    pod = job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in resources["requests"]
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert job["spec"]["backoffLimit"] == 0
    assert container(job)["command"][-1] == "validate"
    assert job["metadata"]["name"] == "run-1-validate"


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    pod = train_job()["spec"]["template"]["spec"]
    security = container(train_job())["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert not any("hostPath" in v for v in pod["volumes"])


def test_job_retries_only_real_failures() -> None:
    spec = train_job()["spec"]
    assert spec["backoffLimit"] == 3
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == [64, 65, 66]
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert spec["ttlSecondsAfterFinished"] == SETTINGS.finished_job_ttl_seconds


def test_children_are_owned_and_labelled() -> None:
    body = make_body()
    objects = [
        train_job(body),
        builders.desired_job(body, parse(body), SETTINGS, TrainerMode.VALIDATE, suspend=False),
        builders.desired_rendezvous_service(body),
    ]
    for obj in objects:
        meta = obj["metadata"]
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuningJob",
                "name": "run-1",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "kubetune"
        assert meta["labels"][naming.LABEL_JOB_UID] == "uid-1"


def test_secrets_are_only_referenced() -> None:
    spec = dict(
        SPEC,
        baseModel={
            "name": "org/model",
            "revision": "abc123",
            "tokenSecretRef": {"name": "hf", "key": "token"},
        },
    )
    body = make_body(spec)
    env = {e["name"]: e for e in container(train_job(body))["env"]}
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }
    rendered = builders.trainer_config_annotation(body, parse(body), SETTINGS)
    assert "valueFrom" not in rendered and "hf" not in json.loads(rendered)["paths"].values()


def test_trainer_config_maps_volumes_to_mounts() -> None:
    body = make_body()
    job = train_job(body)
    template = job["spec"]["template"]
    config = TrainerConfig.model_validate_json(
        template["metadata"]["annotations"][naming.ANNOTATION_TRAINER_CONFIG]
    )
    # Projected as a file from the pod's own annotation: no ConfigMap.
    config_volume = next(v for v in template["spec"]["volumes"] if v["name"] == "config")
    assert config_volume["downwardAPI"]["items"] == [
        {
            "path": "config.json",
            "fieldRef": {"fieldPath": "metadata.annotations['kubetune.dev/trainer-config']"},
        }
    ]
    assert config.paths.base_model == "/mnt/volumes/models/tiny"
    assert config.paths.dataset == "/mnt/volumes/data/train.jsonl"
    # Its own folder: no other job (another name, or this name created again) shares it.
    assert config.paths.output == "/mnt/volumes/models/out/run-1/run-1-uid"
    assert config.report.endpoint is None  # no endpoint configured
    assert config.hyperparameters.epochs == 3
    mounts = {m["mountPath"]: m for m in container(train_job(body))["volumeMounts"]}
    # The output claim is shared with the base model: mounted once, writable.
    assert mounts["/mnt/volumes/models"]["readOnly"] is False
    assert mounts["/mnt/volumes/data"]["readOnly"] is True


def test_trainer_pods_have_no_api_rights_only_a_token_for_the_report_endpoint() -> None:
    reporting = OperatorSettings(
        trainer_image="registry.example/trainer:1",
        report_url="https://ops.kubetune.svc:8443",
        report_ca_pem="-----BEGIN CERTIFICATE-----...",
    )
    body = make_body()
    for mode in TrainerMode:
        job = builders.desired_job(body, parse(body), reporting, mode, suspend=False)
        pod = job["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert "serviceAccountName" not in pod  # the namespace's default, with no token
        [token] = [v for v in pod["volumes"] if v["name"] == "report-token"]
        assert token["projected"]["sources"] == [
            {
                "serviceAccountToken": {
                    "audience": "kubetune-operator",
                    "expirationSeconds": 3600,
                    "path": "token",
                }
            }
        ]
        config = TrainerConfig.model_validate_json(
            job["spec"]["template"]["metadata"]["annotations"][naming.ANNOTATION_TRAINER_CONFIG]
        )
        assert config.report.endpoint.url == "https://ops.kubetune.svc:8443"
        assert config.report.endpoint.token_file == "/var/run/secrets/kubetune/token"
        assert config.report.endpoint.ca_pem.startswith("-----BEGIN CERTIFICATE")
    # Without an endpoint (none configured): no token at all.
    pod = train_job(body)["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if v["name"] == "report-token"]


def test_passthrough_of_placement_and_queue() -> None:
    spec = dict(
        SPEC,
        resources={
            "gpus": 1,
            "nodeSelector": {"pool": "a"},
            "priorityClassName": "training",
            "tolerations": [{"key": "spot", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}},
        },
        activeDeadlineSeconds=600,
        podMetadata={"annotations": {"team": "nlp"}, "labels": {"cost": "x"}},
    )
    body = make_body(spec, labels={naming.KUEUE_QUEUE_LABEL: "gpu-queue"})
    job = train_job(body, suspend=True)
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][naming.KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert job["spec"]["activeDeadlineSeconds"] == 600
    assert pod["nodeSelector"] == {"pool": "a"}
    assert pod["priorityClassName"] == "training"
    assert {"key": "spot", "operator": "Exists"} in pod["tolerations"]
    assert "nodeAffinity" in pod["affinity"]
    template_meta = job["spec"]["template"]["metadata"]
    assert template_meta["annotations"]["team"] == "nlp"
    assert template_meta["labels"]["cost"] == "x"


def test_long_names_are_shortened_stably() -> None:
    owner = "a" * 70
    name = naming.train_job_name(owner)
    assert len(name) <= 63
    assert name == naming.train_job_name(owner)
    assert name.endswith("-train")
    assert naming.train_job_name("b" * 70) != name


def test_spec_hash_changes_with_the_spec() -> None:
    body = make_body()
    other = make_body(dict(SPEC, seed=7))
    assert builders.spec_hash(parse(body)) != builders.spec_hash(parse(other))
