"""A local Kubernetes control plane with simulated GPU nodes.

kwokctl runs the real kube-apiserver, etcd, kube-controller-manager and
kube-scheduler (built from the official Go modules by hack/build-tools.sh) as
local processes, plus the KWOK controller that plays the kubelet for the
simulated nodes. Everything listens on 127.0.0.1 on free ports; the cluster
and its kubeconfig live under ~/.cache/kubetune/kwok/clusters/<name>/, and the
user's ~/.kube/config is never read or written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.dev import nodes, simulation
from kubetune.dev.tools import Tools, ensure_tools, pinned_versions

DEFAULT_NAME = "kubetune"


def _running(pid: int) -> bool:
    """True while `pid` runs (an exited child that nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


class ClusterError(RuntimeError):
    """The local cluster could not be started, reached or stopped."""


def kwokctl_configuration(tools: Tools, kube_version: str) -> dict[str, Any]:
    """kwokctl's configuration: our binaries, loopback only, KWOK on simulated nodes only."""
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {
            "runtime": "binary",
            "bindAddress": "127.0.0.1",
            "kubeVersion": kube_version,
            "securePort": True,
            "kubeAuthorization": True,
            "kubeAdmission": True,
            "cacheDir": str(cache_dir() / "kwok-cache"),
            "kubeApiserverBinary": str(tools["kube-apiserver"]),
            "kubeControllerManagerBinary": str(tools["kube-controller-manager"]),
            "kubeSchedulerBinary": str(tools["kube-scheduler"]),
            "kubectlBinary": str(tools.kubectl),
            "kwokControllerBinary": str(tools["kwok"]),
            "etcdBinary": str(tools["etcd"]),
        },
        "componentsPatches": [
            {
                # Only nodes annotated as simulated are KWOK's: a real node agent
                # can join the same cluster and run its pods for real.
                "name": "kwok-controller",
                "extraArgs": [
                    {"key": "manage-all-nodes", "value": "false"},
                    {
                        "key": "manage-nodes-with-annotation-selector",
                        "value": f"{nodes.SIMULATED_ANNOTATION}={nodes.SIMULATED_VALUE}",
                    },
                ],
            }
        ],
    }


def kwokctl_config_documents(tools: Tools, kube_version: str) -> list[dict[str, Any]]:
    """The whole file passed to `kwokctl create cluster --config`."""
    return [
        kwokctl_configuration(tools, kube_version),
        *simulation.node_stages(),
        *simulation.pod_stages(),
    ]


@dataclass
class LocalCluster:
    """One named local cluster. `up()` and `down()` are idempotent."""

    name: str = DEFAULT_NAME

    def __post_init__(self) -> None:
        self.workdir = cache_dir() / "kwok"
        self._tools: Tools | None = None

    @property
    def tools(self) -> Tools:
        if self._tools is None:
            self._tools = ensure_tools()
        return self._tools

    @property
    def cluster_dir(self) -> Path:
        return self.workdir / "clusters" / self.name

    @property
    def _contexts_flag(self) -> tuple[str, str]:
        """kwokctl adds each cluster to ~/.kube/config (and removes it on delete)
        unless pointed elsewhere: a scratch file in our cache, never the user's."""
        return ("--kubeconfig", str(self.workdir / "kwokctl-contexts.yaml"))

    @property
    def config_file(self) -> Path:
        """The kwokctl configuration the cluster was created from."""
        return self.workdir / "configs" / f"{self.name}.yaml"

    @property
    def kubeconfig(self) -> Path:
        return self.cluster_dir / "kubeconfig.yaml"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KWOK_WORKDIR"] = str(self.workdir)
        # kwokctl waits for readiness with the first kubectl on PATH: ours.
        env["PATH"] = f"{self.tools.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env.pop("KUBECONFIG", None)
        return env

    def _kwokctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.tools.kwokctl), "--name", self.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"kwokctl {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        """Run the cluster's kubectl against this cluster and return its output."""
        result = subprocess.run(
            [str(self.tools.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def exists(self) -> bool:
        return (self.cluster_dir / "kwok.yaml").is_file()

    def healthy(self) -> bool:
        if not self.kubeconfig.is_file():
            return False
        result = subprocess.run(
            [
                str(self.tools.kubectl),
                "--kubeconfig",
                str(self.kubeconfig),
                "get",
                "--raw",
                "/readyz",
                "--request-timeout=5s",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.returncode == 0 and result.stdout.strip() == "ok"

    def up(self, timeout: float = 180, fleet: list[nodes.NodeSpec] | None = None) -> None:
        """Start the cluster (or restart a stopped one) and register the simulated nodes.

        A cluster created from a different configuration (new binaries or
        stages) is recreated, so a checkout never runs on a stale set-up.
        """
        kube_version = pinned_versions()["KUBERNETES_VERSION"]
        wanted = yaml.safe_dump_all(kwokctl_config_documents(self.tools, kube_version))
        config = self.config_file
        if self.exists() and (not config.is_file() or config.read_text() != wanted):
            self._kwokctl("delete", "cluster", *self._contexts_flag)
        if self.exists() and not self.healthy():
            # A stopped cluster (e.g. after a reboot) keeps its state: start it again.
            self._kwokctl("start", "cluster", "--wait", f"{int(timeout)}s", check=False)
            if not self.healthy():
                self._kwokctl("delete", "cluster", *self._contexts_flag, check=False)
        if not self.exists():
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(wanted)
            self._kwokctl(
                "create",
                "cluster",
                *self._contexts_flag,
                "--config",
                str(config),
                "--wait",
                f"{int(timeout)}s",
            )
        self.ensure_nodes(fleet, timeout=timeout)

    def ensure_nodes(self, fleet: list[nodes.NodeSpec] | None = None, timeout: float = 120) -> None:
        """Create the simulated nodes that are missing and wait until all are Ready."""
        fleet = nodes.default_fleet() if fleet is None else fleet
        manifests = [nodes.node_manifest(spec) for spec in fleet]
        if not manifests:
            return
        existing = set(self.kubectl("get", "nodes", "-o", "name").split())
        missing = [m for m in manifests if f"node/{m['metadata']['name']}" not in existing]
        if missing:
            # `create`, not `apply`: a Node's declared capacity is only kept on creation.
            self.kubectl("create", "-f", "-", input=yaml.safe_dump_all(missing))
        deadline = time.monotonic() + timeout
        names = [m["metadata"]["name"] for m in manifests]
        self.kubectl(
            "wait",
            "--for=condition=Ready",
            *[f"node/{n}" for n in names],
            f"--timeout={max(1, int(deadline - time.monotonic()))}s",
        )

    def down(self) -> None:
        """Stop the cluster and delete its state."""
        if self.exists():
            self._kwokctl("delete", "cluster", *self._contexts_flag)
        self.config_file.unlink(missing_ok=True)

    def apply_crds(self, directory: Path, timeout: int = 60) -> None:
        """Apply the CRDs in `directory` (server-side: they are too large for the
        last-applied annotation) and wait until the API server serves each of them."""
        self.kubectl("apply", "--server-side", "-f", str(directory))
        names = [
            yaml.safe_load(p.read_text())["metadata"]["name"]
            for p in sorted(directory.glob("*.yaml"))
        ]
        self.kubectl(
            "wait",
            "--for=condition=Established",
            *[f"crd/{n}" for n in names],
            f"--timeout={timeout}s",
        )

    def restart_component(self, component: str, grace: float = 5, timeout: float = 120) -> None:
        """Stop one control-plane process as a kubelet would (SIGTERM, SIGKILL after
        `grace` seconds: the API server otherwise drains its watches for a minute) and
        start it again with the same command line, then wait until the API server is
        ready.

        kwokctl starts and stops whole clusters only; its binary runtime keeps each
        component's pid in pids/<component>.pid, which is updated here so that
        `kwokctl delete cluster` still stops the new process.
        """
        pid_file = self.cluster_dir / "pids" / f"{component}.pid"
        pid = int(pid_file.read_text().strip())
        proc = Path(f"/proc/{pid}")
        argv = [a.decode() for a in (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")]
        cwd = os.readlink(proc / "cwd")
        env = dict(
            entry.decode().split("=", 1)
            for entry in (proc / "environ").read_bytes().split(b"\0")
            if b"=" in entry
        )
        os.kill(pid, signal.SIGTERM)
        killed_at, deadline = time.monotonic() + grace, time.monotonic() + timeout
        while _running(pid):
            if time.monotonic() > killed_at:
                os.kill(pid, signal.SIGKILL)
                killed_at = deadline
            if time.monotonic() > deadline:
                raise ClusterError(f"{component} (pid {pid}) did not stop")
            time.sleep(0.1)  # a process exiting: nothing to watch
        log = self.cluster_dir / "logs" / f"{component}.log"
        with log.open("ab") as out:
            started = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        pid_file.write_text(str(started.pid))
        while not self.healthy():
            if started.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"{component} did not come back; see {log}")
            time.sleep(0.2)

    def logs(self, component: str) -> str:
        """A control-plane component's log (kube-apiserver, kwok-controller, ...)."""
        return self._kwokctl("logs", component, check=False).stdout
