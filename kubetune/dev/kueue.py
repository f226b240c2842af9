"""Kueue, run out of cluster against a local control plane.

The real Kueue binary (built from its Go module by hack/build-kueue.sh) runs as
a local process, like the control-plane components: its webhook server and
health probe listen on free ports of 127.0.0.1, and the API server reaches the
webhooks at `https://127.0.0.1:<port>/...`. What a Deployment from the chart
would bring is set up here instead:

- the CRDs, with the conversion webhook that Kueue's certificate bootstrap
  insists on injecting its CA into (localqueues, clusterqueues, workloads,
  cohorts, multikueueclusters), pointed at the local webhook server;
- the namespace kueue-system and the Secret kueue-webhook-server-cert, made
  here so that the serving certificate is also valid for 127.0.0.1 (Kueue's
  own one names only the Service), and its files in Kueue's certDir, where a
  kubelet would mount the Secret (the rotator waits for them);
- the webhook configurations, for the paths this Configuration serves only
  (Kueue's own kinds and batch/v1 Jobs): a registered path that nothing serves
  answers 404 and, with failurePolicy Fail, blocks its resource.

`stop()` removes the webhook configurations again, so that Jobs can still be
created once Kueue is gone; the CRDs and Kueue's objects stay.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kubetune.dev.processes import free_port
from kubetune.dev.tools import ensure_kueue

if TYPE_CHECKING:
    from kubetune.dev.cluster import LocalCluster

NAMESPACE = "kueue-system"
SERVICE = "kueue-webhook-service"
SECRET = "kueue-webhook-server-cert"
CA_NAME = "kueue-ca"  # Kueue checks the CA in the Secret under this name
# Kueue injects its CA into webhook configurations named after the Service.
WEBHOOK_CONFIGURATIONS = {
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}
# The CRDs whose conversion webhook Kueue's certificate bootstrap waits on.
CONVERTED_CRDS = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")
# Webhook paths served with integrations.frameworks [batch/job]: Kueue's own kinds
# and Jobs.
SERVED_PATH_PARTS = ("-kueue-x-k8s-io-", "-batch-v1-job")
FRAMEWORKS = ["batch/job"]
FIELD_MANAGER = "kubetune-dev"


class KueueError(RuntimeError):
    """Kueue could not be set up, started or stopped."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    common_name: str,
    public_key: Any,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey],
    *,
    days: int,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer[0])
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer[1], hashes.SHA256())


def webhook_certificates(folder: Path) -> dict[str, bytes]:
    """Made once per folder: the Secret's ca.crt, ca.key, tls.crt and tls.key.

    The CA is the one Kueue's certificate rotator accepts as its own (named
    kueue-ca, RSA key in PKCS#1, valid well past its 90-day renewal horizon), and
    the server certificate names both the Service and 127.0.0.1, where the API
    server calls it here.
    """
    names = ("ca.crt", "ca.key", "tls.crt", "tls.key")
    if all((folder / n).is_file() for n in names):
        return {n: (folder / n).read_bytes() for n in names}
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _certificate(
        CA_NAME,
        ca_key.public_key(),
        (_name(CA_NAME), ca_key),
        days=3650,
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            # digital signature, key encipherment and certificate signing
            (x509.KeyUsage(True, False, True, False, False, True, False, False, False), True),
            (x509.SubjectAlternativeName([x509.DNSName(CA_NAME)]), False),
        ],
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    dns = f"{SERVICE}.{NAMESPACE}.svc"
    alt_names = [x509.DNSName(dns), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = _certificate(
        dns,
        key.public_key(),
        (ca.subject, ca_key),
        days=730,
        extensions=[
            (x509.SubjectAlternativeName(alt_names), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
        ],
    )
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": ca.public_bytes(pem),
        "ca.key": ca_key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
        "tls.crt": cert.public_bytes(pem),
        "tls.key": key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
    }
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)
    return files


def configuration(webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration: Jobs with a queue-name label only, no waitForPodsReady
    (left out: off), loopback ports, its own certificate management."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        # With internal certificate management off, the metrics server expects its
        # certificates at a fixed /etc path: no metrics here.
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": SERVICE,
            "webhookSecretName": SECRET,
        },
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(FRAMEWORKS)},
    }


def served_webhooks(manifests: list[dict[str, Any]], url: str, ca: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, kept to the served paths and pointed at `url`."""
    bundle = base64.b64encode(ca).decode()
    result = []
    for document in manifests:
        kind = document.get("kind")
        if kind not in WEBHOOK_CONFIGURATIONS:
            continue
        webhooks = []
        for webhook in document.get("webhooks") or []:
            path = webhook["clientConfig"]["service"]["path"]
            if any(part in path for part in SERVED_PATH_PARTS):
                webhooks.append(
                    {**webhook, "clientConfig": {"url": f"{url}{path}", "caBundle": bundle}}
                )
        result.append(
            {
                "apiVersion": document["apiVersion"],
                "kind": kind,
                "metadata": {"name": WEBHOOK_CONFIGURATIONS[kind]},
                "webhooks": webhooks,
            }
        )
    return result


def with_conversion(crd: dict[str, Any], url: str, ca: bytes) -> dict[str, Any]:
    """The CRD, with a conversion webhook at `url`/convert when Kueue expects one."""
    if crd["spec"]["names"]["plural"] not in CONVERTED_CRDS:
        return crd
    conversion = {
        "strategy": "Webhook",
        "webhook": {
            "clientConfig": {"url": f"{url}/convert", "caBundle": base64.b64encode(ca).decode()},
            "conversionReviewVersions": ["v1"],
        },
    }
    return {**crd, "spec": {**crd["spec"], "conversion": conversion}}


class Kueue:
    """One Kueue process for one cluster. `start()` installs what it needs first."""

    def __init__(
        self, kubeconfig: Path, kubectl: Path, workdir: Path, kueue_dir: Path | None = None
    ) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl_path = kubectl
        self.workdir = workdir
        self.kueue_dir = kueue_dir or ensure_kueue()
        self.log_path = workdir / "kueue.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.webhook_port = 0
        self.health_port = 0
        self.served_urls: list[str] = []

    @classmethod
    def for_cluster(cls, cluster: LocalCluster, workdir: Path | None = None) -> Kueue:
        return cls(
            cluster.kubeconfig, cluster.tools.kubectl, workdir or cluster.cluster_dir / "kueue"
        )

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise KueueError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def apply(self, documents: list[dict[str, Any]]) -> None:
        """Server-side apply, as this helper's field manager."""
        self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            f"--field-manager={FIELD_MANAGER}",
            "-f",
            "-",
            input=yaml.safe_dump_all(documents),
        )

    def install(self, timeout: int = 60) -> None:
        """CRDs (with conversion at this process's port), namespace, certificate Secret
        and the webhook configurations."""
        certs = webhook_certificates(self.workdir / "certs")
        crds = [
            with_conversion(yaml.safe_load(p.read_text()), self.url, certs["ca.crt"])
            for p in sorted((self.kueue_dir / "crds").glob("*.yaml"))
        ]
        self.apply(crds)
        self.kubectl(
            "wait",
            "--for=condition=Established",
            *[f"crd/{crd['metadata']['name']}" for crd in crds],
            f"--timeout={timeout}s",
        )
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
            "data": {k: base64.b64encode(v).decode() for k, v in certs.items()},
        }
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        self.apply([namespace, secret])
        manifests = list(
            yaml.safe_load_all((self.kueue_dir / "webhook-manifests.yaml").read_text())
        )
        webhooks = served_webhooks([m for m in manifests if m], self.url, certs["ca.crt"])
        self.apply(webhooks)
        self.served_urls = [w["clientConfig"]["url"] for c in webhooks for w in c["webhooks"]]

    def start(self, timeout: float = 120) -> None:
        """Install, start the process and wait until its webhooks answer."""
        if self.process is not None and self.process.poll() is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.webhook_port, self.health_port = free_port(), free_port()
        self.install()
        # Kueue's certificate rotator waits until the Secret appears in certDir, as a
        # kubelet would mount it into its pod.
        cert_dir = self.workdir / "serving-certs"
        cert_dir.mkdir(exist_ok=True)
        for name, data in webhook_certificates(self.workdir / "certs").items():
            (cert_dir / name).write_bytes(data)
            (cert_dir / name).chmod(0o600)
        config_file = self.workdir / "configuration.yaml"
        config_file.write_text(
            yaml.safe_dump(configuration(self.webhook_port, self.health_port, cert_dir))
        )
        args = [
            str(self.kueue_dir / "kueue"),
            f"--kubeconfig={self.kubeconfig}",
            f"--config={config_file}",
            # The visibility API server wants an APIService and its own certificates.
            "--feature-gates=VisibilityOnDemand=false",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """The health probe's /readyz (certificates in place, webhook server listening),
        then every registered webhook path answering (not 404) over TLS with our CA."""
        deadline = time.monotonic() + timeout
        context = ssl.create_default_context(cadata=(self.workdir / "certs" / "ca.crt").read_text())
        pending = [f"http://127.0.0.1:{self.health_port}/readyz"]
        pending += [*self.served_urls, f"{self.url}/convert"]
        while pending:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise KueueError(f"kueue exited with {code}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise KueueError(
                    f"kueue not ready after {timeout}s (waiting for {pending[0]}); see {self.log_path}"
                )
            if self._answers(pending[0], context):
                pending.pop(0)
            else:
                time.sleep(0.3)  # process start-up: there is nothing to watch yet

    @staticmethod
    def _answers(url: str, context: ssl.SSLContext) -> bool:
        if url.startswith("http://"):
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False
        request = urllib.request.Request(
            url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=2, context=context):
                return True
        except urllib.error.HTTPError as error:
            return error.code != 404  # served: a bad review is answered, not "not found"
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> None:
        """Stop the process and remove the webhook configurations (with nothing to answer
        them, they would refuse every Job)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        names = [f"{kind.lower()}s/{name}" for kind, name in WEBHOOK_CONFIGURATIONS.items()]
        self.kubectl("delete", *names, "--ignore-not-found", "--wait=false", check=False)

    def __enter__(self) -> Kueue:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
