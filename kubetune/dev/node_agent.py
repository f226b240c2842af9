"""A development node agent: a Node whose pods really run, as local processes.

Development and test tooling only, not part of the product. It plays the
kubelet's part for one Node, without containers: it registers the Node (CPU,
memory and, for demos, a fake `nvidia.com/gpu` count), keeps it Ready, and
for every pod the scheduler binds to it runs the pod's first container's
command and args as a local process with:

* env resolved like a kubelet (values, `secretKeyRef`, `configMapKeyRef`,
  downward API `fieldRef`);
* volumes mapped to local folders (kubetune.dev.pod_volumes):
  PersistentVolumeClaims to their PersistentVolume's `hostPath`; ConfigMaps,
  Secrets, downward-API and projected volumes written out as files; emptyDirs
  as scratch folders; paths under a mount point are rewritten to the local
  folder in the command, args, env, ConfigMap and downward-API files;
* read-only mounts read-only for the process alone, in a mount namespace of
  its own (where the machine allows it);
* the token of the pod's API-access volume (an audience-less projected
  service-account token) in a kubeconfig named by KUBECONFIG, so the process
  has exactly the pod's rights;
* the termination message file, read back when the process ends.

Pod status goes back through the `pods/status` subresource as a kubelet
reports it: phase, conditions, container state, exit code and termination
message. The image is ignored: `python` runs this interpreter, so the pod runs
the code of this checkout. Nodes without KWOK's annotation are not KWOK's, so
both can serve one cluster.

    python -m kubetune.dev.node_agent --kubeconfig KUBECONFIG --name local-0 --gpus 1
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from kubetune.dev.nodes import GPU_RESOURCE, NODE_ROLE_LABEL
from kubetune.dev.pod_volumes import (
    ApiAccess,
    VolumeResolver,
    bind_plan,
    executable,
    field_value,
    mount_namespace,
    rewrite,
)

log = logging.getLogger("kubetune.node-agent")

HEARTBEAT_SECONDS = 10
LOG_TAIL_BYTES = 2048
TERMINATION_ENV = "KUBETUNE_TERMINATION_MESSAGE_PATH"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_manifest(name: str, cpu: int, memory: str, gpus: int) -> dict[str, Any]:
    """The agent's Node: schedulable, no KWOK annotation (so KWOK leaves it alone)."""
    capacity = {"cpu": str(cpu), "memory": memory, "pods": "20", "ephemeral-storage": "100Gi"}
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        NODE_ROLE_LABEL: "local",
    }
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
        labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "LOCAL-CPU"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def remap(value: str, mounts: dict[str, Path]) -> str:
    """Rewrite container paths under a mount point to the local folder.

    One pass, longest mount first, matching only whole leading path segments:
    a rewritten path is never rewritten again (the local folders may well
    live under a mount point such as /tmp).
    """
    if not mounts:
        return value
    alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])")
    return pattern.sub(lambda match: str(mounts[match.group(1)]), value)


@dataclass
class RunningPod:
    uid: str
    namespace: str
    name: str
    process: subprocess.Popen[bytes]
    directory: Path
    termination_path: Path
    log_path: Path
    fallback_to_logs: bool
    started_at: str
    stopping: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class NodeAgent:
    def __init__(
        self, kubeconfig: Path, name: str, root: Path, *, cpu: int, memory: str, gpus: int
    ) -> None:
        self.kubeconfig = kubeconfig
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.volumes = VolumeResolver(self.core, self.api.configuration.ssl_ca_cert)
        self.name = name
        self.root = root
        self.cpu, self.memory, self.gpus = cpu, memory, gpus
        self.pods: dict[str, RunningPod] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.since = now()  # conditions have not changed since the agent started

    # --- node ------------------------------------------------------------------
    def register(self) -> None:
        try:
            self.core.create_node(node_manifest(self.name, self.cpu, self.memory, self.gpus))
        except ApiException as err:
            if err.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        stamp = now()
        conditions = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ("Ready", "True", "KubeletReady"),
        ]
        status = {
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": "node agent",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": self.since,
                }
                for t, s, r in conditions
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "kubetune-node-agent",
                "containerRuntimeVersion": "local-process://",
                "kernelVersion": os.uname().release,
                "osImage": "local",
                "kubeProxyVersion": "",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
            },
        }
        self.core.patch_node_status(self.name, {"status": status})

    def _heartbeats(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except (ApiException, OSError) as err:
                log.warning("heartbeat failed: %s", err)

    # --- pods --------------------------------------------------------------------
    def run(self) -> None:
        self.register()
        threading.Thread(target=self._heartbeats, daemon=True).start()
        log.info("node %s ready", self.name)
        while not self.stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={self.name}",
                    timeout_seconds=60,
                ):
                    self.handle(event["type"], event["object"])
                    if self.stop.is_set():
                        stream.stop()
            except ApiException as err:
                log.warning("pod watch failed: %s", err.reason)
                self.stop.wait(1)

    def handle(self, kind: str, pod: client.V1Pod) -> None:
        uid = pod.metadata.uid
        if kind == "DELETED":
            self.kill(uid)
            return
        if pod.metadata.deletion_timestamp is not None:
            threading.Thread(target=self.terminate, args=(pod,), daemon=True).start()
            return
        with self.lock:
            known = uid in self.pods
        if not known and pod.status.phase == "Pending":
            try:
                self.start(pod)
            except Exception as err:  # report any set-up problem on the pod, as a kubelet would
                log.exception("cannot start %s/%s", pod.metadata.namespace, pod.metadata.name)
                self._report_failure_to_start(pod, str(err))

    def _pod_kubeconfig(self, pod: client.V1Pod, directory: Path, access: ApiAccess) -> Path:
        """A kubeconfig carrying the pod's own service-account token."""
        cluster = {"server": self.api.configuration.host}
        ca = access.ca or self.api.configuration.ssl_ca_cert
        if ca:
            cluster["certificate-authority"] = str(ca)
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": cluster}],
            "users": [{"name": "pod", "user": {"tokenFile": str(access.token)}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {
                        "cluster": "cluster",
                        "user": "pod",
                        "namespace": pod.metadata.namespace,
                    },
                }
            ],
            "current-context": "pod",
        }
        path = directory / "kubeconfig.yaml"
        path.write_text(yaml.safe_dump(kubeconfig))
        return path

    def _env(
        self, pod: client.V1Pod, container: client.V1Container, mounts: dict[str, Path]
    ) -> dict[str, str]:
        namespace = pod.metadata.namespace
        fields = {
            "metadata.name": pod.metadata.name,
            "metadata.namespace": namespace,
            "metadata.uid": pod.metadata.uid,
            "spec.nodeName": self.name,
            "spec.serviceAccountName": pod.spec.service_account_name or "default",
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        # What the process needs of this machine to run this checkout's Python.
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            in (
                "PATH",
                "PYTHONPATH",
                "LANG",
                "HF_HUB_OFFLINE",
                "HF_DATASETS_OFFLINE",
                "HF_UPDATE_DOWNLOAD_COUNTS",
                "TOKENIZERS_PARALLELISM",
                "OMP_NUM_THREADS",
            )
        }
        for var in container.env or []:
            if var.value is not None:
                env[var.name] = remap(var.value, mounts)
            elif var.value_from and var.value_from.secret_key_ref:
                ref = var.value_from.secret_key_ref
                secret = self.core.read_namespaced_secret(ref.name, namespace)
                env[var.name] = base64.b64decode((secret.data or {})[ref.key]).decode()
            elif var.value_from and var.value_from.config_map_key_ref:
                ref = var.value_from.config_map_key_ref
                env[var.name] = (
                    self.core.read_namespaced_config_map(ref.name, namespace).data or {}
                )[ref.key]
            elif var.value_from and var.value_from.field_ref:
                env[var.name] = self._field(pod, var.value_from.field_ref.field_path, fields)
        return env

    @staticmethod
    def _field(pod: client.V1Pod, path: str, fields: dict[str, str]) -> str:
        """A downward-API field: the plain ones, and metadata.annotations['key'] and
        metadata.labels['key'] (how an Indexed Job gives JOB_COMPLETION_INDEX)."""
        if path in fields:
            return fields[path]
        try:
            return field_value(pod, path)
        except ValueError:
            return ""

    @staticmethod
    def _expand(value: str, env: dict[str, str]) -> str:
        """$(VAR) references in a command or args, as a kubelet expands them ($$ escapes)."""
        return re.sub(
            r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
            lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
            value,
        )

    @staticmethod
    def _resolve_peers(value: str, pod: client.V1Pod) -> str:
        """Names of pods under this pod's headless Service (<hostname>.<subdomain>...) are
        pods of this node, all at 127.0.0.1: what cluster DNS would answer with pod IPs."""
        subdomain = pod.spec.subdomain
        if not subdomain:
            return value
        namespace = re.escape(pod.metadata.namespace)
        pattern = (
            rf"\b[a-z0-9]([-a-z0-9]*[a-z0-9])?\.{re.escape(subdomain)}"
            rf"(\.{namespace}(\.svc(\.cluster\.local)?)?)?(?![\w.-])"
        )
        return re.sub(pattern, "127.0.0.1", value)

    def start(self, pod: client.V1Pod) -> None:
        container = pod.spec.containers[0]
        directory = (
            self.root / pod.metadata.namespace / f"{pod.metadata.name}-{pod.metadata.uid[:8]}"
        )
        directory.mkdir(parents=True, exist_ok=True)
        volumes = self.volumes.resolve(pod, directory)
        mounts: dict[str, Path] = {}
        mounted: list[tuple[Path, bool]] = []
        for mount in container.volume_mounts or []:
            local = volumes.folders[mount.name] / (mount.sub_path or "")
            if not local.exists():  # a kubelet creates a missing subPath as a folder
                local.mkdir(parents=True)
            mounts[mount.mount_path.rstrip("/")] = local
            mounted.append((local, bool(mount.read_only) or mount.name in volumes.read_only))
        # ConfigMap and downward-API files mention container paths: point them at
        # the local folders.
        for path in volumes.remappable:
            rewrite(path, lambda text: remap(text, mounts))
        termination_path = directory / "termination-log"
        termination_path.write_text("")
        mounts[container.termination_message_path or "/dev/termination-log"] = termination_path
        env = self._env(pod, container, mounts)
        env[TERMINATION_ENV] = str(termination_path)
        names = {mount.name for mount in container.volume_mounts or []}
        access = next((a for a in volumes.api_access if a.volume in names), None)
        if access is not None:
            env["KUBECONFIG"] = str(self._pod_kubeconfig(pod, directory, access))
        argv = [
            self._resolve_peers(self._expand(remap(part, mounts), env), pod)
            for part in (container.command or []) + (container.args or [])
        ]
        env = {name: self._resolve_peers(value, pod) for name, value in env.items()}
        if not argv:
            raise RuntimeError("no command: the node agent cannot run an image's entrypoint")
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        argv[0] = executable(argv[0], env.get("PATH"))
        launch = argv
        # The pod's own folder (termination message, emptyDirs) stays writable
        # even under a read-only volume's folder.
        plan = bind_plan(mounted, [directory])
        if any(read_only for _, read_only in plan) and (namespace := mount_namespace()):
            launch = namespace.wrap(argv, plan)
        log_path = directory / f"{container.name}.log"
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                launch,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=remap(container.working_dir, mounts) if container.working_dir else directory,
                start_new_session=True,
            )
        running = RunningPod(
            uid=pod.metadata.uid,
            namespace=pod.metadata.namespace,
            name=pod.metadata.name,
            process=process,
            directory=directory,
            termination_path=termination_path,
            log_path=log_path,
            fallback_to_logs=container.termination_message_policy == "FallbackToLogsOnError",
            started_at=now(),
        )
        with self.lock:
            self.pods[pod.metadata.uid] = running
        self._patch_status(pod, self._running_status(pod, running))
        log.info(
            "started %s/%s (pid %d): %s",
            pod.metadata.namespace,
            pod.metadata.name,
            process.pid,
            " ".join(argv),
        )
        threading.Thread(target=self._wait, args=(pod, running), daemon=True).start()

    def _running_status(self, pod: client.V1Pod, running: RunningPod) -> dict[str, Any]:
        stamp = running.started_at
        container = pod.spec.containers[0]
        return {
            "phase": "Running",
            "startTime": stamp,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": stamp}
                for t in (
                    "PodReadyToStartContainers",
                    "Initialized",
                    "ContainersReady",
                    "Ready",
                    "PodScheduled",
                )
            ],
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": stamp}},
                }
            ],
        }

    def _terminated_status(
        self, pod: client.V1Pod, running: RunningPod, code: int
    ) -> dict[str, Any]:
        message = running.termination_path.read_text(errors="replace").strip()
        if not message and code != 0 and running.fallback_to_logs:
            with running.log_path.open("rb") as log_file:
                log_file.seek(max(0, running.log_path.stat().st_size - LOG_TAIL_BYTES))
                message = log_file.read().decode(errors="replace").strip()
        container = pod.spec.containers[0]
        stamp = now()
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": running.started_at,
            "finishedAt": stamp,
        }
        if message:
            terminated["message"] = message[:4096]
        not_ready = {"status": "False", "reason": "PodCompleted", "lastTransitionTime": stamp}
        return {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "True",
                    "lastTransitionTime": running.started_at,
                },
                {"type": "Initialized", "status": "True", "lastTransitionTime": running.started_at},
                {"type": "PodReadyToStartContainers", **not_ready},
                {"type": "ContainersReady", **not_ready},
                {"type": "Ready", **not_ready},
            ],
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }

    def _wait(self, pod: client.V1Pod, running: RunningPod) -> None:
        code = running.process.wait()
        # A signal shows as -N from Popen; a kubelet reports 128 + N.
        code = 128 - code if code < 0 else code
        log.info("%s/%s exited with %d", running.namespace, running.name, code)
        try:
            self._patch_status(
                pod, self._terminated_status(pod, running, code), keep_conditions=running.stopping
            )
        except ApiException as err:
            if err.status != 404:
                log.warning("cannot report %s/%s: %s", running.namespace, running.name, err.reason)
        running.extra["reported"] = True

    def terminate(self, pod: client.V1Pod) -> None:
        """A deleted pod: SIGTERM, the grace period, SIGKILL; report; then remove it."""
        with self.lock:
            running = self.pods.get(pod.metadata.uid)
        if running is not None and not running.stopping:
            running.stopping = True
            grace = pod.metadata.deletion_grace_period_seconds or 30
            try:
                os.killpg(running.process.pid, signal.SIGTERM)
                running.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(running.process.pid, signal.SIGKILL)
                running.process.wait()
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while not running.extra.get("reported") and time.monotonic() < deadline:
                time.sleep(0.05)  # the waiter thread reports the exit
        elif running is not None:
            return
        try:
            self.core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                grace_period_seconds=0,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions={"uid": pod.metadata.uid}
                ),
            )
        except ApiException as err:
            if err.status not in (404, 409):
                log.warning(
                    "cannot remove %s/%s: %s", pod.metadata.namespace, pod.metadata.name, err.reason
                )

    def kill(self, uid: str) -> None:
        with self.lock:
            running = self.pods.pop(uid, None)
        if running is not None and running.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGKILL)

    def _patch_status(
        self, pod: client.V1Pod, status: dict[str, Any], *, keep_conditions: bool = False
    ) -> None:
        if (
            keep_conditions
        ):  # an evicted or deleted pod keeps what the API server set (DisruptionTarget)
            current = self.core.read_namespaced_pod_status(
                pod.metadata.name, pod.metadata.namespace
            )
            extra = [
                c.to_dict() for c in current.status.conditions or [] if c.type == "DisruptionTarget"
            ]
            status["conditions"] += [
                {
                    "type": c["type"],
                    "status": c["status"],
                    "reason": c.get("reason"),
                    "message": c.get("message"),
                    "lastTransitionTime": c["last_transition_time"].strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
                for c in extra
            ]
        self.core.patch_namespaced_pod_status(
            pod.metadata.name, pod.metadata.namespace, {"status": status}
        )

    def _report_failure_to_start(self, pod: client.V1Pod, message: str) -> None:
        container = pod.spec.containers[0]
        stamp = now()
        status = {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 128,
                            "reason": "StartError",
                            "message": message[:4096],
                            "startedAt": stamp,
                            "finishedAt": stamp,
                        }
                    },
                }
            ],
        }
        try:
            self._patch_status(pod, status)
        except ApiException as err:
            log.warning(
                "cannot report %s/%s: %s", pod.metadata.namespace, pod.metadata.name, err.reason
            )

    def shutdown(self) -> None:
        self.stop.set()
        with self.lock:
            uids = list(self.pods)
        for uid in uids:
            self.kill(uid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run pods bound to one Node as local processes.")
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--name", default="local-0")
    parser.add_argument("--root", type=Path, default=None, help="Folder for pod files and logs.")
    parser.add_argument("--cpu", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--memory", default="16Gi")
    parser.add_argument(
        "--gpus", type=int, default=1, help="Fake nvidia.com/gpu count (for demos)."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    root = args.root or args.kubeconfig.parent / "node-agent" / args.name
    agent = NodeAgent(
        args.kubeconfig, args.name, root, cpu=args.cpu, memory=args.memory, gpus=args.gpus
    )
    signal.signal(signal.SIGTERM, lambda *_: (agent.shutdown(), sys.exit(0)))
    agent.run()


if __name__ == "__main__":
    main()
