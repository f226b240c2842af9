"""Multi-GPU and multi-node jobs: torchrun commands, the Indexed Job and its Service, and
restarting all pods together when one fails."""

from __future__ import annotations

import copy

from kubetune_operator import builders, naming
from kubetune_operator import conditions as c
from kubetune_operator.observed import Observed
from kubetune_operator.plan import plan
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.status import derive_status

from kubetune.api.finetuningjob import FailureReason, FineTuningJobStatus, Phase
from kubetune.api.trainer import TrainerMode
from tests.unit.operator.conftest import NOW, SPEC, condition, job, make_body, parse, pod

SETTINGS = OperatorSettings(trainer_image="registry.example/trainer:1")


def spec_with(**resources) -> dict:
    spec = copy.deepcopy(SPEC)
    spec["resources"] = {**spec["resources"], **resources}
    return spec


def train_job(body, restart=0):
    return builders.desired_job(
        body, parse(body), SETTINGS, TrainerMode.TRAIN, suspend=False, restart=restart
    )


def command(job_object) -> list[str]:
    return job_object["spec"]["template"]["spec"]["containers"][0]["command"]


def test_one_gpu_runs_the_trainer_itself() -> None:
    body = make_body(spec_with(gpus=1))
    assert command(train_job(body))[:3] == ["python", "-m", "kubetune_trainer"]


def test_several_gpus_on_one_pod_start_one_process_per_gpu() -> None:
    job_object = train_job(make_body(spec_with(gpus=8)))
    assert command(job_object)[:6] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=8",
        "--standalone",
        "-m",
    ]
    assert "completionMode" not in job_object["spec"]
    assert job_object["spec"]["backoffLimit"] == 3  # one pod retries in place
    validation = builders.desired_job(
        make_body(spec_with(gpus=8)),
        parse(make_body(spec_with(gpus=8))),
        SETTINGS,
        TrainerMode.VALIDATE,
        suspend=False,
    )
    assert command(validation)[:3] == ["python", "-m", "kubetune_trainer"]  # one CPU process


def test_nodes_make_an_indexed_job_with_stable_names_and_torchrun_across_pods() -> None:
    body = make_body(spec_with(gpus=8, nodes=4))
    job_object = train_job(body, restart=2)
    spec = job_object["spec"]
    pod_spec = spec["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimit"] == 0  # the first failure ends the attempt
    assert pod_spec["subdomain"] == "run-1-workers"
    assert command(job_object)[3:8] == [
        "--nproc-per-node=8",
        "--nnodes=4",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=run-1-train-0.run-1-workers",
        "--master-port=29500",
    ]
    resources = pod_spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "8"  # per pod
    assert spec["template"]["metadata"]["annotations"][naming.ANNOTATION_RESTART] == "2"
    assert job_object["metadata"]["annotations"][naming.ANNOTATION_RESTART] == "2"
    spread = pod_spec["affinity"]["podAntiAffinity"]
    term = spread["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    service = builders.desired_rendezvous_service(body)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "run-1-train"}
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_cpu_processes_share_the_pods_cpus() -> None:
    spec = spec_with(gpus=0, cpu="8", nodes=2)
    spec["distributed"] = {"processesPerNode": 2}
    job_object = train_job(make_body(spec))
    container = job_object["spec"]["template"]["spec"]["containers"][0]
    assert "--nproc-per-node=2" in container["command"]
    assert {"name": "OMP_NUM_THREADS", "value": "4"} in container["env"]


def test_a_service_name_starts_with_a_letter() -> None:
    assert naming.rendezvous_service_name("7b-run") == "t7b-run-workers"


def indexed_pod(name, phase, index, *, owner_uid, restart=0, **kwargs):
    p = pod(name, phase, **kwargs)
    p["metadata"]["ownerReferences"] = [{"uid": owner_uid}]
    p["metadata"]["annotations"] = {
        naming.ANNOTATION_RESTART: str(restart),
        naming.ANNOTATION_COMPLETION_INDEX: str(index),
    }
    return p


def failed_attempt(restart=0, *, disrupted=False):
    attempt = job(
        "run-1-train",
        conditions=[condition("Failed", "BackoffLimitExceeded")],
        start=True,
    )
    attempt["metadata"]["uid"] = f"job-{restart}"
    attempt["metadata"]["annotations"][naming.ANNOTATION_RESTART] = str(restart)
    conditions = (
        [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]
        if disrupted
        else []
    )
    pods = [
        indexed_pod("p0", "Running", 0, owner_uid=f"job-{restart}", restart=restart),
        indexed_pod(
            "p1",
            "Failed",
            1,
            owner_uid=f"job-{restart}",
            restart=restart,
            terminated={"exitCode": 1, "message": "CUDA error"},
            conditions=conditions,
        ),
    ]
    return attempt, pods


def derive(body, previous, **observed):
    validated = job("run-1-validate", conditions=[condition("Complete")])
    return derive_status(
        body,
        parse(body),
        previous,
        Observed(now=NOW, validate_job=validated, **observed),
        SETTINGS,
    )


def test_a_failed_rank_ends_the_attempt_and_all_pods_restart_once() -> None:
    body = make_body(spec_with(gpus=8, nodes=2))
    attempt, pods = failed_attempt()
    status = derive(body, FineTuningJobStatus(), train_job=attempt, train_pods=pods)
    assert status.phase == Phase.RUNNING
    assert (status.retries, status.restarts, status.preemptions) == (1, 1, 0)
    running = {cond.type: cond for cond in status.conditions}[c.RUNNING]
    assert running.reason == c.RESTARTING and "restarting all 2 pods" in running.message
    # Seen again (a resync, a second replica): counted once.
    again = derive(body, status, train_job=attempt, train_pods=pods)
    assert (again.retries, again.restarts) == (1, 1)
    # The plan removes the attempt, pods first, and then starts the next one.
    observed = Observed(now=NOW, train_job=attempt, train_pods=pods)
    changes = plan(body, parse(body), again, observed, SETTINGS)
    assert changes.delete_train_job and changes.wait_for_pods
    gone = plan(body, parse(body), again, Observed(now=NOW), SETTINGS)
    [service, next_attempt] = [o for o in gone.create if o["kind"] in ("Service", "Job")]
    assert (service["kind"], next_attempt["kind"]) == ("Service", "Job")
    assert next_attempt["metadata"]["annotations"][naming.ANNOTATION_RESTART] == "1"


def test_a_disrupted_pod_restarts_the_attempt_as_a_preemption() -> None:
    body = make_body(spec_with(gpus=8, nodes=2))
    attempt, pods = failed_attempt(disrupted=True)
    status = derive(body, FineTuningJobStatus(), train_job=attempt, train_pods=pods)
    assert (status.retries, status.preemptions, status.restarts) == (0, 1, 1)


def test_restarts_stop_when_the_retries_are_spent() -> None:
    spec = spec_with(gpus=8, nodes=2)
    spec["maxRetries"] = 1
    body = make_body(spec)
    attempt, pods = failed_attempt(restart=1)
    previous = FineTuningJobStatus(retries=1, restarts=1)
    status = derive(body, previous, train_job=attempt, train_pods=pods)
    assert status.phase == Phase.FAILED
    assert status.failure.reason == FailureReason.TRAINER_ERROR
    assert status.failure.message == "failed 2 time(s), last error: CUDA error"


def test_bad_input_on_any_rank_fails_the_job_without_restarts() -> None:
    body = make_body(spec_with(gpus=8, nodes=2))
    attempt, pods = failed_attempt()
    attempt["status"]["conditions"] = [condition("Failed", "PodFailurePolicy")]
    pods[1]["status"]["containerStatuses"][0]["state"]["terminated"] = {
        "exitCode": 65,
        "message": "train.jsonl line 3: not JSON",
    }
    status = derive(body, FineTuningJobStatus(), train_job=attempt, train_pods=pods)
    assert status.phase == Phase.FAILED
    assert status.failure.reason == FailureReason.INVALID_DATASET
    assert status.restarts == 0


def test_pods_of_an_earlier_attempt_are_not_the_current_ones() -> None:
    body = make_body(spec_with(gpus=8, nodes=2))
    current = job("run-1-train", start=True)
    current["metadata"]["uid"] = "job-1"
    current["metadata"]["annotations"][naming.ANNOTATION_RESTART] = "1"
    _, old_pods = failed_attempt(restart=0)
    fresh = [indexed_pod(f"n{i}", "Running", i, owner_uid="job-1", restart=1) for i in range(2)]
    previous = FineTuningJobStatus(retries=1, restarts=1)
    status = derive(body, previous, train_job=current, train_pods=old_pods + fresh)
    assert status.phase == Phase.RUNNING
    assert (status.retries, status.restarts) == (1, 1)
    assert status.world_size == 16
