"""kubetune beside the Kubeflow training-operator: the same jobs through each operator.

On one local control plane with simulated 8-GPU nodes, for each size N, N jobs of
the same shape go through one operator at a time, each run in a namespace of its
own that is deleted (and waited for) before the next:

* kubetune: N FineTuningJobs, its operator at its defaults; dataset validation off
  (dataset.validateFirst false), so each job makes one training Job; model
  registration on, as by default (a RegisteredModel per job);
* training-operator (v1.9.3, built by hack/build-peers.sh): N PyTorchJobs, at its
  defaults (--kube-api-qps 20, --kube-api-burst 30, --controller-threads 1) and
  tuned (1000, 2000, 8).

Two shapes: one pod per job (kubetune: spec.resources.nodes 1; PyTorchJob: 1
Master) and four (nodes 4: an Indexed Job of four pods and a headless Service;
PyTorchJob: 1 Master + 3 Workers, a Service each), sizes --sizes and
--multi-sizes. Every pod asks for 2 CPUs, 8Gi and one GPU, tolerates the GPU taint
and runs 1 s on a simulated node; there are enough nodes for all pods of the
largest run at once.

Measured the same way for both, from the first create:

* pods: until a watch on the namespace's pods has seen all N x pods of them;
* succeeded: until all N are Succeeded (FineTuningJob phase; PyTorchJob condition);
* p50/p99: per job, from its create call to when the watch received its last pod;
* requests/job: the operator's own client-side count of its API requests
  (kubetune_operator_api_requests_total; controller-runtime's
  rest_client_requests_total), events included, from the first create until all
  are Succeeded and the count has stopped moving (client-go sends events in the
  background); controller-manager/job: kube-controller-manager's own count
  meanwhile (its Job controller makes kubetune's pods); API server/job: what the
  API server served meanwhile (apiserver_request_total, every client: operators,
  controller manager, scheduler, KWOK, this benchmark);
* CPU s: the operator's user+system CPU over the same span; peak MiB: its VmHWM;
* x ceiling: each time divided by the time the same API server takes to create
  the same number of bare pods (with a scheduling gate, so nothing schedules them)
  from 16 client threads, measured on the same cluster before the runs of each size.

Run by hand (`make bench-peers`), never in CI or tests:
    python bench/peers.py [--sizes 100 1000] [--multi-sizes 25 250] [--out bench/results/peers.md]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import math
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from _cluster_bench import (  # noqa: E402
    CREATE_THREADS,
    cpu_seconds,
    fleet,
    metric_total,
    peak_memory_mib,
    percentile,
    watch_until,
)
from kubetune_operator import naming  # noqa: E402

from kubetune.dev import simulation  # noqa: E402
from kubetune.dev.cluster import LocalCluster, cache_dir  # noqa: E402
from kubetune.dev.nodes import GPU_RESOURCE, GPU_TOLERATION  # noqa: E402
from kubetune.dev.processes import OperatorProcess, free_port  # noqa: E402
from kubetune.dev.tools import pinned_versions  # noqa: E402
from tests.support import finetuning as ft  # noqa: E402
from tests.support.kube import Kube  # noqa: E402

BUILD_SCRIPT = REPO / "hack" / "build-peers.sh"
RUN_TIME = "1s"  # simulated training time of every pod
GPUS_PER_NODE = 8
# The resources of every pod, as kubetune writes them for ft.BASE_SPEC's resources.
POD_RESOURCES = {
    "requests": {"cpu": "2", "memory": "8Gi", GPU_RESOURCE: "1"},
    "limits": {"memory": "8Gi", GPU_RESOURCE: "1"},
}
IMAGE = "registry.invalid/trainer:1"

# The training-operator, run out of cluster: what its Deployment would bring.
TO_NAMESPACE = "kubeflow"  # MY_POD_NAMESPACE: where it looks for its webhook Secret
TO_SECRET = "training-operator-webhook-cert"
TO_CA_NAME = "training-operator-ca"  # its cert rotator checks the CA under this name
TO_SERVICE_DNS = f"training-operator.{TO_NAMESPACE}.svc"
# The webhook server reads its serving certificate from this fixed folder.
TO_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
PT_GROUP, PT_VERSION, PT_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
PT_JOB_LABEL = "training.kubeflow.org/job-name"

SETTINGS = {
    "defaults": [],
    "tuned": ["--kube-api-qps=1000", "--kube-api-burst=2000", "--controller-threads=8"],
}


# --- the training-operator -------------------------------------------------------------


def ensure_training_operator() -> Path:
    """The training-operator's folder (built on first use): the binary and crds/."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"hack/build-peers.sh failed with exit code {result.returncode}")
    return Path(lines[-1])


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def webhook_certificates(folder: Path) -> dict[str, bytes]:
    """Made once per folder: the webhook Secret's ca.crt, ca.key, tls.crt and tls.key.

    The CA is one the cert rotator accepts as its own (named training-operator-ca, an
    RSA key in PKCS#1, valid past its 90-day renewal horizon), so it never rewrites the
    Secret; the server certificate names the Service and 127.0.0.1."""
    names = ("ca.crt", "ca.key", "tls.crt", "tls.key")
    if all((folder / n).is_file() for n in names):
        return {n: (folder / n).read_bytes() for n in names}
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(TO_CA_NAME))
        .issuer_name(_name(TO_CA_NAME))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                key_cert_sign=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TO_CA_NAME)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alt_names = [
        x509.DNSName(TO_SERVICE_DNS),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(TO_SERVICE_DNS))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs1 = serialization.PrivateFormat.TraditionalOpenSSL
    files = {
        "ca.crt": ca.public_bytes(pem),
        "ca.key": ca_key.private_bytes(pem, pkcs1, serialization.NoEncryption()),
        "tls.crt": cert.public_bytes(pem),
        "tls.key": key.private_bytes(pem, pkcs1, serialization.NoEncryption()),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
        if name.endswith(".key"):
            (folder / name).chmod(0o600)
    return files


def prepare_training_operator(cluster: LocalCluster, kube: Kube, folder: Path) -> None:
    """Its CRD, its namespace with the webhook Secret, and the serving certificate where
    its webhook server reads it. No webhook configuration: its webhooks are never called."""
    cluster.apply_crds(folder / "crds")
    files = webhook_certificates(cache_dir() / "peers" / "training-operator-certs")
    kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=TO_NAMESPACE)))
    kube.core.create_namespaced_secret(
        TO_NAMESPACE,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=TO_SECRET),
            type="Opaque",
            data={k: base64.b64encode(v).decode() for k, v in files.items()},
        ),
    )
    TO_CERT_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("tls.crt", "tls.key"):
        (TO_CERT_DIR / name).write_bytes(files[name])
        (TO_CERT_DIR / name).chmod(0o600)


class TrainingOperator:
    """`training-operator.v1` out of cluster, PyTorchJobs only, with its log in a file."""

    def __init__(self, binary: Path, kubeconfig: Path, log_path: Path, flags: list[str]) -> None:
        self.binary, self.kubeconfig, self.log_path, self.flags = (
            binary,
            kubeconfig,
            log_path,
            flags,
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_port = self.health_port = 0

    def start(self, timeout: float = 90) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        env = dict(os.environ, MY_POD_NAMESPACE=TO_NAMESPACE)
        for name in ("KUBECONFIG", "KUBEFLOW_NAMESPACE"):
            env.pop(name, None)
        args = [
            str(self.binary),
            f"--kubeconfig={self.kubeconfig}",
            "--enable-scheme=pytorchjob",
            "--leader-elect=false",
            f"--metrics-bind-address=127.0.0.1:{self.metrics_port}",
            f"--health-probe-bind-address=127.0.0.1:{self.health_port}",
            f"--webhook-server-port={free_port()}",
            *self.flags,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        # Ready once its certificates are in place and the webhook server listens; its
        # controller starts its workers after that, once its caches are synced.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"training-operator exited with {self.process.returncode}; see {self.log_path}"
                )
            if self._ready() and self._workers_started():
                return
            time.sleep(0.2)  # process start-up: nothing to watch yet
        raise RuntimeError(f"training-operator not ready after {timeout}s; see {self.log_path}")

    def _ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.health_port}/readyz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def _workers_started(self) -> bool:
        return any(
            "Starting workers" in line and "pytorchjob-controller" in line
            for line in self.log_path.read_text(errors="replace").splitlines()
        )

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


# --- the two operators behind one interface ----------------------------------------------


@dataclass
class Contender:
    """One operator at one setting: how to start it, submit a job, and read its counts."""

    operator: str
    setting: str
    key: str  # names its namespaces
    start: Callable[[Path], Any]  # log folder -> a started process (OperatorProcess-like)
    prepare_namespace: Callable[[Kube, str], None]
    create: Callable[[Kube, str, str, int], None]  # kube, namespace, name, pods per job
    list_fn: Callable[[Kube, str], Callable[..., Any]]
    succeeded: Callable[[dict], bool]
    pod_owner: Callable[[dict], str | None]
    requests: Callable[[Any], Counter]  # process -> requests by verb/method so far


def kubetune_body(name: str, pods: int) -> dict:
    resources = {**ft.BASE_SPEC["resources"]} | ({"nodes": pods} if pods > 1 else {})
    return ft.manifest(
        name,
        duration=RUN_TIME,
        dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False},
        resources=resources,
    )


def kubetune_succeeded(obj: dict) -> bool:
    phase = (obj.get("status") or {}).get("phase")
    if phase in ("Failed", "Cancelled"):
        raise RuntimeError(f"FineTuningJob {obj['metadata']['name']} is {phase}")
    return phase == "Succeeded"


def kubetune_requests(operator: OperatorProcess) -> Counter:
    counts: Counter = Counter()
    for line in operator.metrics().splitlines():
        if line.startswith("kubetune_operator_api_requests_total{"):
            verb = re.search(r'verb="([^"]*)"', line).group(1)
            counts[verb] += float(line.rsplit(" ", 1)[1])
    return counts


def kubetune_contender(kubeconfig: Path) -> Contender:
    def start(logs: Path) -> OperatorProcess:
        operator = OperatorProcess(kubeconfig, logs / "kubetune-operator.log")
        operator.start()
        return operator

    def prepare(kube: Kube, namespace: str) -> None:
        ft.create_volumes(kube, namespace)

    return Contender(
        operator="kubetune",
        setting="defaults",
        key="kubetune",
        start=start,
        prepare_namespace=prepare,
        create=lambda kube, ns, name, pods: ft.create(kube, ns, kubetune_body(name, pods)),
        list_fn=ft.lister,
        succeeded=kubetune_succeeded,
        pod_owner=lambda pod: (pod["metadata"].get("annotations") or {}).get(
            naming.ANNOTATION_OWNER
        ),
        requests=kubetune_requests,
    )


def pod_template() -> dict:
    return {
        "metadata": {
            "annotations": simulation.pod_annotations("succeed", duration=RUN_TIME),
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "tolerations": [dict(GPU_TOLERATION)],
            "containers": [
                {
                    "name": "pytorch",  # the container the training-operator looks for
                    "image": IMAGE,
                    "command": ["torchrun", "train.py"],
                    "resources": POD_RESOURCES,
                }
            ],
        },
    }


def pytorchjob_body(name: str, pods: int) -> dict:
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "Never", "template": pod_template()}
    }
    if pods > 1:
        replicas["Worker"] = {
            "replicas": pods - 1,
            "restartPolicy": "Never",
            "template": pod_template(),
        }
    return {
        "apiVersion": f"{PT_GROUP}/{PT_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": replicas},
    }


def pytorchjob_succeeded(obj: dict) -> bool:
    conditions = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
    if conditions.get("Failed") == "True":
        raise RuntimeError(f"PyTorchJob {obj['metadata']['name']} failed")
    return conditions.get("Succeeded") == "True"


def pytorchjob_lister(kube: Kube, namespace: str) -> Callable[..., Any]:
    def list_pytorchjobs(**kwargs: Any) -> Any:
        return kube.custom.list_namespaced_custom_object(
            PT_GROUP, PT_VERSION, namespace, PT_PLURAL, **kwargs
        )

    return list_pytorchjobs


def rest_client_requests(operator: TrainingOperator) -> Counter:
    counts: Counter = Counter()
    for line in operator.metrics().splitlines():
        if line.startswith("rest_client_requests_total{"):
            method = re.search(r'method="([^"]*)"', line).group(1)
            counts[method] += float(line.rsplit(" ", 1)[1])
    return counts


def training_operator_contender(binary: Path, kubeconfig: Path, setting: str) -> Contender:
    def start(logs: Path) -> TrainingOperator:
        operator = TrainingOperator(
            binary, kubeconfig, logs / f"training-operator-{setting}.log", SETTINGS[setting]
        )
        operator.start()
        return operator

    return Contender(
        operator="training-operator",
        setting=setting,
        key=f"to-{setting}",
        start=start,
        prepare_namespace=lambda kube, namespace: None,
        create=lambda kube, ns, name, pods: kube.custom.create_namespaced_custom_object(
            PT_GROUP, PT_VERSION, ns, PT_PLURAL, pytorchjob_body(name, pods)
        ),
        list_fn=pytorchjob_lister,
        succeeded=pytorchjob_succeeded,
        pod_owner=lambda pod: (pod["metadata"].get("labels") or {}).get(PT_JOB_LABEL),
        requests=rest_client_requests,
    )


# --- measuring ------------------------------------------------------------------------


class Background(threading.Thread):
    """A thread whose result (or exception) `result()` hands back after joining."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._target_fn, self._value, self._error = target, None, None

    def run(self) -> None:
        try:
            self._value = self._target_fn()
        except BaseException as err:  # handed to the caller
            self._error = err

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def raw_pods(kube: Kube, namespace: str) -> Callable[..., Any]:
    # No docstring: the watch then hands back plain dicts (much cheaper than models).
    def list_pods(**kwargs: Any) -> Any:
        return kube.core.list_namespaced_pod(namespace, **kwargs)

    return list_pods


def apiserver_requests(cluster: LocalCluster) -> Counter:
    """The API server's served requests so far, by verb and resource (every client)."""
    counts: Counter = Counter()
    for line in cluster.kubectl("get", "--raw", "/metrics").splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            resource = labels.get("resource", "")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            counts[f"{labels.get('verb', '')} {resource}"] += float(line.rsplit(" ", 1)[1])
    return counts


def controller_manager_requests(cluster: LocalCluster) -> tuple[float, float]:
    """Requests kube-controller-manager has sent so far (all its controllers: the Job
    controller makes kubetune's pods, the endpoints controllers follow Services), and the
    seconds its requests waited on its client-side rate limit, from its own
    rest_client_* metrics; its /metrics needs no authorization here."""
    pid = int((cluster.cluster_dir / "pids" / "kube-controller-manager.pid").read_text())
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    port = next(a.split("=", 1)[1] for a in argv if a.startswith("--secure-port="))
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # its own local CA
    with urllib.request.urlopen(
        f"https://127.0.0.1:{port}/metrics", context=context, timeout=10
    ) as response:
        text = response.read().decode()
    return (
        metric_total(text, "rest_client_requests_total"),
        metric_total(text, "rest_client_rate_limiter_duration_seconds_sum"),
    )


def wait_quiet(read: Callable[[], Counter], quiet_s: float = 3, timeout: float = 60) -> None:
    """Wait until a count stops changing for `quiet_s`: events are sent in the background
    (client-go queues them), so the last ones may still be on their way at the end."""
    last, since = read(), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        now = read()
        if now != last:
            last, since = now, time.monotonic()


def create_namespace(kube: Kube, namespace: str) -> None:
    kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))


def delete_namespace(kube: Kube, namespace: str, timeout: float = 900) -> None:
    """Delete the namespace and wait until it is gone, so no deletion overlaps a run."""
    kube.core.delete_namespace(namespace)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kube.core.read_namespace(namespace)
        except ApiException as err:
            if err.status == 404:
                break
            raise
        time.sleep(1)  # the namespace controller works through its contents
    else:
        raise TimeoutError(f"namespace {namespace} still there after {timeout}s")
    for claim in ("models", "datasets"):  # kubetune's statically bound volumes
        try:
            kube.core.delete_persistent_volume(f"{namespace}-{claim}")
        except ApiException as err:
            if err.status != 404:
                raise


def ceiling_pod(name: str) -> dict:
    template = pod_template()
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **template["metadata"]},
        # A scheduling gate: the scheduler leaves it alone; the ceiling is the API server's.
        "spec": {**template["spec"], "schedulingGates": [{"name": "kubetune.dev/bench-hold"}]},
    }


def measure_ceiling(kube: Kube, namespace: str, pods: int) -> float:
    """Creating `pods` bare pods with CREATE_THREADS client threads, no operator at all."""
    create_namespace(kube, namespace)
    started = time.monotonic()
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(
            pool.map(
                lambda i: kube.core.create_namespaced_pod(namespace, ceiling_pod(f"raw-{i:05d}")),
                range(pods),
            )
        )
    elapsed = time.monotonic() - started
    delete_namespace(kube, namespace)
    return elapsed


@dataclass
class Row:
    operator: str
    setting: str
    shape: str
    n: int
    pods: int
    ceiling_s: float
    pods_s: float
    succeeded_s: float
    p50_ms: float
    p99_ms: float
    requests_per_job: float
    apiserver_per_job: float
    kcm_per_job: float
    kcm_waited_s: float
    cpu_s: float
    peak_mib: float
    operator_requests: dict[str, float] = field(default_factory=dict)
    apiserver_requests: dict[str, float] = field(default_factory=dict)


def run_one(
    cluster: LocalCluster,
    kube: Kube,
    contender: Contender,
    shape: str,
    pods_per_job: int,
    n: int,
    ceiling_s: float,
    logs: Path,
) -> Row:
    namespace = f"{contender.key}-{pods_per_job}x{n}"
    create_namespace(kube, namespace)
    contender.prepare_namespace(kube, namespace)
    total_pods = n * pods_per_job
    process = contender.start(logs)
    try:
        time.sleep(2)  # let its start-up requests settle: they are not the jobs'
        pid = process.process.pid
        requests_before = contender.requests(process)
        apiserver_before = apiserver_requests(cluster)
        kcm_before = controller_manager_requests(cluster)
        cpu_before = cpu_seconds(pid)

        created_at: dict[str, float] = {}
        pods_of: dict[str, dict[str, float]] = {}
        lock = threading.Lock()

        def note_pod(name: str, pod: dict) -> None:
            received = time.monotonic()
            owner = contender.pod_owner(pod)
            if owner:
                with lock:
                    pods_of.setdefault(owner, {}).setdefault(name, received)

        pods_seen = Background(
            lambda: watch_until(
                raw_pods(kube, namespace), total_pods, lambda _: True, 600, note_pod
            )
        )
        finished = Background(
            lambda: watch_until(contender.list_fn(kube, namespace), n, contender.succeeded, 1800)
        )
        pods_seen.start()
        finished.start()
        time.sleep(0.5)  # both watches open before the first create

        def create(i: int) -> None:
            name = f"job-{i:05d}"
            created_at[name] = time.monotonic()
            contender.create(kube, namespace, name, pods_per_job)

        started = time.monotonic()
        with ThreadPoolExecutor(CREATE_THREADS) as pool:
            list(pool.map(create, range(n)))
        all_pods = pods_seen.result()
        all_succeeded = finished.result()
        wait_quiet(lambda: contender.requests(process))

        requests = contender.requests(process) - requests_before
        apiserver = apiserver_requests(cluster) - apiserver_before
        kcm_after = controller_manager_requests(cluster)
        kcm, kcm_waited = kcm_after[0] - kcm_before[0], kcm_after[1] - kcm_before[1]
        cpu = cpu_seconds(pid) - cpu_before
        peak, _ = peak_memory_mib(pid)
    finally:
        process.stop()
    delete_namespace(kube, namespace)

    latencies = [max(pods_of[name].values()) - created_at[name] for name in created_at]
    return Row(
        operator=contender.operator,
        setting=contender.setting,
        shape=shape,
        n=n,
        pods=total_pods,
        ceiling_s=ceiling_s,
        pods_s=all_pods - started,
        succeeded_s=all_succeeded - started,
        p50_ms=1000 * statistics.median(latencies),
        p99_ms=1000 * percentile(latencies, 0.99),
        requests_per_job=sum(requests.values()) / n,
        apiserver_per_job=sum(apiserver.values()) / n,
        kcm_per_job=kcm / n,
        kcm_waited_s=kcm_waited,
        cpu_s=cpu,
        peak_mib=peak,
        operator_requests={k: v / n for k, v in requests.most_common()},
        apiserver_requests={k: v / n for k, v in apiserver.most_common(12)},
    )


# --- report -------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        "| operator | setting | shape | N | pods | ceiling | pods exist | x ceiling "
        "| all Succeeded | x ceiling | p50 | p99 | requests/job | controller-manager/job "
        "| API server/job | CPU s | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.operator} | {r.setting} | {r.shape} | {r.n} | {r.pods} | {r.ceiling_s:.2f} s "
            f"| {r.pods_s:.1f} s | {r.pods_s / r.ceiling_s:.1f}x "
            f"| {r.succeeded_s:.1f} s | {r.succeeded_s / r.ceiling_s:.1f}x "
            f"| {r.p50_ms:.0f} ms | {r.p99_ms:.0f} ms | {r.requests_per_job:.1f} "
            f"| {r.kcm_per_job:.1f} | {r.apiserver_per_job:.1f} | {r.cpu_s:.1f} "
            f"| {r.peak_mib:.0f} |"
        )
    return "\n".join(lines)


def breakdown(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        own = ", ".join(f"{k} {v:.2f}" for k, v in r.operator_requests.items())
        served = ", ".join(f"{k} {v:.2f}" for k, v in r.apiserver_requests.items())
        lines.append(
            f"- {r.operator} {r.setting}, {r.shape}, N={r.n}: operator's own requests per "
            f"job by verb: {own}; API server per job, top resources: {served}; "
            f"controller-manager requests waited {r.kcm_waited_s:.1f} s in all on its "
            "client rate limit"
        )
    return "\n".join(lines)


def report(rows: list[Row], nodes: int) -> str:
    versions = pinned_versions()
    legend = (
        f"One local control plane (Kubernetes {versions['KUBERNETES_VERSION']}, KWOK "
        f"{versions['KWOK_VERSION']}) with {nodes} simulated {GPUS_PER_NODE}-GPU nodes, on "
        f"{os.cpu_count()} CPUs shared with the operator; training-operator "
        f"{versions['TRAINING_OPERATOR_VERSION']}. Every pod: 2 CPUs, 8Gi, one GPU, "
        f"{RUN_TIME} of simulated run time. kubetune at its defaults (QPS 200, burst 400, "
        "8 workers), validation off, registration on; training-operator defaults: QPS 20, "
        "burst 30, 1 controller thread; tuned: QPS 1000, burst 2000, 8 threads. "
        "Shapes: 1 pod per job, or 4 (kubetune spec.resources.nodes 4: an Indexed Job + a "
        "headless Service; PyTorchJob 1 Master + 3 Workers, a Service each).\n\n"
        "Times from the first create: pods exist (every pod seen by a watch), all Succeeded "
        "(FineTuningJob phase, PyTorchJob condition). p50/p99: per job, create call to "
        "receipt of its last pod on the watch. x ceiling: over the time the same API server "
        f"took to create as many bare pods (scheduling-gated) from {CREATE_THREADS} threads, "
        "measured before each size's runs. requests/job: the operator's own client-side "
        "count (kubetune_operator_api_requests_total; rest_client_requests_total), events "
        "included, from the first create until all are Succeeded and the count is still for "
        "3 s. kubetune's pods are created by the Job controller of kube-controller-manager "
        "(client QPS 20, burst 30 by default), which that count leaves out: "
        "controller-manager/job is its own rest_client_requests_total over the same span (all "
        "its controllers, e.g. endpoints for the training-operator's Services). API "
        "server/job: apiserver_request_total over the span, all clients. CPU s: the "
        "operator's user+system time over the span; peak MiB: its VmHWM."
    )
    return (
        f"# kubetune and the Kubeflow training-operator\n\n{legend}\n\n{table(rows)}\n\n"
        f"Requests per job:\n\n{breakdown(rows)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--multi-sizes", type=int, nargs="*", default=[25, 250])
    parser.add_argument("--multi-pods", type=int, default=4, help="pods per job, second shape")
    parser.add_argument(
        "--nodes", type=int, default=0, help="simulated nodes (0: enough for the largest run)"
    )
    parser.add_argument(
        "--operators",
        nargs="+",
        default=["kubetune", "training-operator/defaults", "training-operator/tuned"],
        help="which to run",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "peers.md")
    args = parser.parse_args()

    runs = [("1 pod", 1, n) for n in args.sizes] + [
        (f"{args.multi_pods} pods", args.multi_pods, n) for n in args.multi_sizes
    ]
    most_pods = max(pods * n for _, pods, n in runs)
    nodes = args.nodes or math.ceil(most_pods / GPUS_PER_NODE)

    to_folder = ensure_training_operator()
    cluster = LocalCluster("bench-peers")
    contenders = []
    for name in args.operators:
        if name == "kubetune":
            contenders.append(kubetune_contender(cluster.kubeconfig))
        else:
            binary = to_folder / "training-operator.v1"
            setting = name.split("/", 1)[1]
            contenders.append(training_operator_contender(binary, cluster.kubeconfig, setting))

    cluster.down()
    cluster.up(fleet=[])
    cluster.ensure_nodes(fleet(nodes), timeout=300)
    cluster.apply_crds(REPO / "crds")
    kube = Kube.from_kubeconfig(cluster.kubeconfig, connections=CREATE_THREADS * 2)
    prepare_training_operator(cluster, kube, to_folder)
    logs = Path(tempfile.mkdtemp(prefix="kubetune-peers-"))
    print(f"operator logs in {logs}", flush=True)

    rows: list[Row] = []
    try:
        for shape, pods, n in runs:
            ceiling = measure_ceiling(kube, f"ceiling-{pods}x{n}", pods * n)
            print(f"{shape}, N={n}: ceiling {ceiling:.2f} s for {pods * n} pods", flush=True)
            for contender in contenders:
                row = run_one(cluster, kube, contender, shape, pods, n, ceiling, logs)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    finally:
        cluster.down()

    text = report(rows, nodes)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
