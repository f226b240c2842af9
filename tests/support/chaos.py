"""Faults under load, and a ledger of everything the API server showed meanwhile.

`run_chaos` submits FineTuningJobs to simulated nodes while two operator replicas
with leader election are SIGKILLed at random moments and the API server and etcd
are restarted; watches kept for the whole run record every FineTuningJob status,
Job, trainer pod and RegisteredModel they see. The counts it returns are zero
when nothing went wrong, except the successes. bench/chaos.py runs it at full
size by hand; tests/integration/test_chaos.py runs a short version.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from kubetune.dev.cluster import LocalCluster
from kubetune.dev.nodes import NodeSpec
from kubetune.dev.processes import OperatorProcess
from tests.support import finetuning as ft
from tests.support.kube import Kube

LEASE = "kubetune-operator"
JOB_LABEL = "kubetune.dev/job-name"
COMPONENT_LABEL = "app.kubernetes.io/component"


def fleet(jobs: int) -> list[NodeSpec]:
    """8-GPU nodes enough to run every job at once, and CPU nodes for the validation pods
    (which do not tolerate the GPU nodes' taint)."""
    gpu = [
        NodeSpec(
            name=f"chaos-gpu-{i}", pool="chaos-gpu", cpu="256", memory="2Ti", gpus=8,
            gpu_product="NVIDIA-H100-80GB-HBM3", gpu_memory_mib=81559,
        )
        for i in range(jobs // 8 + 1)
    ]  # fmt: skip
    cpu = [
        NodeSpec(name=f"chaos-cpu-{i}", pool="chaos-cpu", cpu="256", memory="2Ti")
        for i in range(jobs // 100 + 1)
    ]
    return gpu + cpu


def start_cluster(name: str, namespace: str, jobs: int, crds: Path) -> LocalCluster:
    """A fresh cluster with nodes for `jobs` jobs, the CRDs, and `namespace` with the
    volumes the jobs name. The caller deletes it (`down()`)."""
    cluster = LocalCluster(name)
    cluster.down()
    cluster.up(fleet=fleet(jobs))
    try:
        cluster.apply_crds(crds)
        kube = Kube.from_kubeconfig(cluster.kubeconfig)
        kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        ft.create_volumes(kube, namespace)
    except BaseException:
        cluster.down()
        raise
    return cluster


def _resource_version(obj: Any) -> int:
    meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
    value = meta["resourceVersion"] if isinstance(meta, dict) else meta.resource_version
    return int(value)


class Follower(threading.Thread):
    """List, then watch from the list's version, for as long as the run lasts; when the
    API server goes away (a restart) or the watch expires, list and watch again.
    Every object seen, listed or watched, goes to `seen` at most once per version.

    Not the operator's own informer (kubetune_operator.cache): the instrument that
    checks the operator must not share its code, nor its slimming and cached lists."""

    def __init__(self, list_fn: Callable[..., Any], seen: Callable[[str, Any], None], **kwargs):
        super().__init__(daemon=True)
        self.list_fn, self.seen, self.kwargs = list_fn, seen, kwargs
        self.stopping = threading.Event()
        self.versions: dict[str, int] = {}
        self.relists = 0

    def _offer(self, kind: str, obj: Any) -> None:
        meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
        uid = meta["uid"] if isinstance(meta, dict) else meta.uid
        version = _resource_version(obj)
        if kind != "DELETED" and self.versions.get(uid, -1) >= version:
            return  # seen already (a relist repeats what the watch showed)
        self.versions[uid] = version
        self.seen(kind, obj)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.list_fn(**self.kwargs, _request_timeout=10)
                items = listing["items"] if isinstance(listing, dict) else listing.items
                for obj in items:
                    self._offer("LISTED", obj)
                version = (
                    listing["metadata"]["resourceVersion"]
                    if isinstance(listing, dict)
                    else listing.metadata.resource_version
                )
                stream = watch.Watch()
                for event in stream.stream(
                    self.list_fn,
                    resource_version=version,
                    timeout_seconds=30,
                    _request_timeout=40,
                    **self.kwargs,
                ):
                    if event["type"] == "ERROR":
                        break  # 410 Gone: list again
                    self._offer(event["type"], event["object"])
                    if self.stopping.is_set():
                        stream.stop()
            except Exception:  # the API server restarting: try again
                self.relists += 1
                self.stopping.wait(0.5)


@dataclass
class Ledger:
    """What the watches saw, kept for the whole run."""

    phases: dict[str, str] = field(default_factory=dict)
    succeeded: set[str] = field(default_factory=set)
    registered: set[str] = field(default_factory=set)
    ever_failed: set[str] = field(default_factory=set)
    regressions: list[str] = field(default_factory=list)
    jobs: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    attempts: dict[str, int] = field(default_factory=dict)
    trainer_pods: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    models: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def job_seen(self, kind: str, obj: dict) -> None:
        name, status = obj["metadata"]["name"], obj.get("status") or {}
        phase = status.get("phase")
        registered = any(
            c.get("type") == "Registered" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        with self.lock:
            if name in self.succeeded and phase != "Succeeded" and kind != "DELETED":
                self.regressions.append(f"{name}: Succeeded, then {phase}")
            if name in self.registered and not registered and kind != "DELETED":
                self.regressions.append(f"{name}: Registered, then not")
            if phase:
                self.phases[name] = phase
            if phase == "Succeeded":
                self.succeeded.add(name)
            if phase == "Failed":
                self.ever_failed.add(name)
            if registered:
                self.registered.add(name)
            # A retry, preemption or restart is a new attempt, with a Job of its own.
            attempt = 1 + sum(status.get(k) or 0 for k in ("retries", "preemptions", "restarts"))
            self.attempts[name] = max(self.attempts.get(name, 0), attempt)

    def child_job_seen(self, _kind: str, obj: client.V1Job) -> None:
        labels = obj.metadata.labels or {}
        if JOB_LABEL in labels:
            with self.lock:
                key = (labels[JOB_LABEL], labels.get(COMPONENT_LABEL, ""))
                self.jobs[key].add(obj.metadata.uid)

    def pod_seen(self, _kind: str, obj: client.V1Pod) -> None:
        labels = obj.metadata.labels or {}
        if JOB_LABEL in labels and labels.get(COMPONENT_LABEL) == "trainer":
            with self.lock:
                self.trainer_pods[labels[JOB_LABEL]].add(obj.metadata.uid)

    def model_seen(self, _kind: str, obj: dict) -> None:
        source = (obj.get("spec") or {}).get("sourceJob") or {}
        with self.lock:
            self.models[source.get("name", "")].add(obj["metadata"]["uid"])

    def counts(self, names: list[str]) -> dict[str, int]:
        """Successes, and every way the run went wrong (each should be zero)."""
        with self.lock:
            training = {n: len(self.jobs.get((n, "trainer"), ())) for n in names}
            validation = {n: len(self.jobs.get((n, "dataset-validator"), ())) for n in names}
            return {
                "succeeded": sum(self.phases.get(n) == "Succeeded" for n in names),
                "not succeeded": sum(self.phases.get(n) != "Succeeded" for n in names),
                "ever failed": len(self.ever_failed & set(names)),
                "retried": sum(self.attempts.get(n, 1) > 1 for n in names),
                "extra training jobs": sum(
                    max(0, training[n] - self.attempts.get(n, 1)) for n in names
                ),
                "missing training jobs": sum(training[n] == 0 for n in names),
                "extra validation jobs": sum(max(0, v - 1) for v in validation.values()),
                "trained twice": sum(
                    len(self.trainer_pods.get(n, ())) > self.attempts.get(n, 1) for n in names
                ),
                "missing models": sum(len(self.models.get(n, ())) == 0 for n in names),
                "extra models": sum(max(0, len(self.models.get(n, ())) - 1) for n in names),
                "status regressions": len(self.regressions),
            }


@dataclass
class ChaosPlan:
    jobs: int = 200
    kills: int = 10
    window_seconds: float = 120  # jobs are submitted and faults happen within this
    restart_apiserver: bool = True
    restart_etcd: bool = True
    lease_seconds: int = 5
    seed: int = 1
    timeout_seconds: float = 900


@dataclass
class ChaosResult:
    counts: dict[str, int]
    kills: int
    takeovers: int
    restarts: list[str]
    relists: int
    wall_seconds: float
    regressions: list[str]


class Replicas:
    """Two operator processes on one Lease; SIGKILL one, start it again."""

    def __init__(self, cluster: LocalCluster, namespace: str, logs: Path, lease_seconds: int):
        self.kube = Kube.from_kubeconfig(cluster.kubeconfig)
        self.namespace = namespace
        self.processes = [
            OperatorProcess(
                cluster.kubeconfig,
                logs / f"operator-{i}.log",
                leader_election="",
                leader_election_namespace=namespace,
                leader_election_id=LEASE,
                leader_election_lease_seconds=str(lease_seconds),
                workers="4",
                image_pull_timeout="30",
            )
            for i in range(2)
        ]

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def holder(self) -> OperatorProcess | None:
        try:
            lease = self.kube.api_coordination.read_namespaced_lease(
                LEASE, self.namespace, _request_timeout=5
            )
        except Exception:  # no Lease yet, or the API server is restarting
            return None
        identity = lease.spec.holder_identity or ""
        for process in self.processes:
            if process.process and f"_{process.process.pid}_" in identity:
                return process
        return None

    def transitions(self) -> int:
        lease = self.kube.api_coordination.read_namespaced_lease(LEASE, self.namespace)
        return lease.spec.lease_transitions or 0

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def run_chaos(cluster: LocalCluster, namespace: str, logs: Path, plan: ChaosPlan) -> ChaosResult:
    """Submit `plan.jobs` jobs and inject the faults; return what the watches saw."""
    rng = random.Random(plan.seed)
    kube = Kube.from_kubeconfig(cluster.kubeconfig, connections=8)
    ledger = Ledger()
    followers = [
        Follower(ft.lister(kube, namespace), ledger.job_seen),
        Follower(kube.batch.list_namespaced_job, ledger.child_job_seen, namespace=namespace),
        Follower(kube.core.list_namespaced_pod, ledger.pod_seen, namespace=namespace),
        Follower(ft.lister(kube, namespace, "registeredmodels"), ledger.model_seen),
    ]
    for follower in followers:
        follower.start()
    replicas = Replicas(cluster, namespace, logs, plan.lease_seconds)
    replicas.start()

    window = plan.window_seconds
    faults: list[tuple[float, str]] = [(rng.uniform(2, window), "kill") for _ in range(plan.kills)]
    if plan.restart_apiserver:
        faults.append((rng.uniform(window * 0.25, window * 0.5), "kube-apiserver"))
    if plan.restart_etcd:
        faults.append((rng.uniform(window * 0.5, window * 0.75), "etcd"))
    faults.sort()
    names = [f"chaos-{i:04d}" for i in range(plan.jobs)]
    submit_at = sorted(rng.uniform(0, window * 0.8) for _ in names)

    started = time.monotonic()
    kills, restarts = 0, []
    pending = list(zip(submit_at, names, strict=True))
    try:
        while pending or faults:
            now = time.monotonic() - started
            while pending and pending[0][0] <= now:
                _, name = pending.pop(0)
                _submit(kube, namespace, name, rng)
            if faults and faults[0][0] <= now:
                _, fault = faults.pop(0)
                if fault == "kill":
                    # Mostly the leader (its work is the one to lose), sometimes the standby.
                    target = replicas.holder() if rng.random() < 0.8 else None
                    target = target or rng.choice(replicas.processes)
                    target.kill()
                    kills += 1
                    time.sleep(rng.uniform(0, 2))  # down for a moment, like a pod restart
                    target.start(timeout=120)
                else:
                    cluster.restart_component(fault)
                    restarts.append(fault)
            time.sleep(0.05)
        deadline = started + plan.timeout_seconds
        while time.monotonic() < deadline:
            with ledger.lock:
                done = all(n in ledger.registered and n in ledger.succeeded for n in names)
            if done:
                break
            time.sleep(0.5)
        takeovers = replicas.transitions()
    finally:
        replicas.stop()
        for follower in followers:
            follower.stopping.set()
    return ChaosResult(
        counts=ledger.counts(names),
        kills=kills,
        takeovers=takeovers,
        restarts=restarts,
        relists=sum(f.relists for f in followers),
        wall_seconds=time.monotonic() - started,
        regressions=ledger.regressions,
    )


def _submit(kube: Kube, namespace: str, name: str, rng: random.Random) -> None:
    """A job of 1 to 6 s of simulated training; half of them validate their data first."""
    dataset = {**ft.BASE_SPEC["dataset"], "validateFirst": rng.random() < 0.5}
    body = ft.manifest(name, duration=f"{rng.randint(1, 6)}s", dataset=dataset)
    for _ in range(60):  # the API server may be restarting right now
        try:
            ft.create(kube, namespace, body)
            return
        except client.exceptions.ApiException as err:
            if err.status == 409:
                return  # the create went through before its answer was lost
        except Exception:  # connection refused during a restart
            pass
        time.sleep(0.5)
    raise RuntimeError(f"could not create {name}")
