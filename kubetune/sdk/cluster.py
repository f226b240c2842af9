"""FineTuningJobs, sweeps, merges and RegisteredModels on a cluster: the calls the SDK and
the CLI share."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubetune.api import GROUP, VERSION, FineTuningJob, FineTuningJobSpec
from kubetune.api.trainer import TRAINER_LOG_FILE

JOBS = "finetuningjobs"
MODELS = "registeredmodels"
SWEEPS = "finetuningsweeps"
MERGES = "modelmerges"
TERMINAL_PHASES = ("Succeeded", "Failed", "Cancelled")
JOB_NAME_LABEL = "kubetune.dev/job-name"
COMPONENT_LABEL = "app.kubernetes.io/component"
OWNER_ANNOTATION = "kubetune.dev/finetuningjob"


class ClusterError(Exception):
    """A problem talking to the cluster, worded for the user."""


class NoKubeconfig(ClusterError):
    pass


class NotFound(ClusterError):
    pass


def default_kubeconfig() -> Path | None:
    """The kubeconfig kubectl would use: $KUBECONFIG (first entry), else ~/.kube/config."""
    env = os.environ.get("KUBECONFIG", "")
    for entry in env.split(os.pathsep):
        if entry and Path(entry).expanduser().is_file():
            return Path(entry).expanduser()
    if env.strip(os.pathsep):
        return None
    home = Path("~/.kube/config").expanduser()
    return home if home.is_file() else None


def kubeconfig_available() -> bool:
    return default_kubeconfig() is not None


def resolve_kubeconfig(path: str | Path | None) -> Path:
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise NoKubeconfig(f"kubeconfig {path} does not exist")
        return path
    found = default_kubeconfig()
    if found is None:
        raise NoKubeconfig(
            "no kubeconfig: set KUBECONFIG or pass --kubeconfig (or train on this machine "
            "with --local / backend='local'; `kubetune dev up` starts a local cluster)"
        )
    return found


def _api_error(err: Exception, what: str) -> ClusterError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(err, ApiException):
        if err.status == 404:
            return NotFound(f"{what} not found")
        detail = err.reason
        try:
            import json

            detail = json.loads(err.body).get("message", detail)
        except Exception:
            pass
        return ClusterError(f"{what}: {detail} (HTTP {err.status})")
    return ClusterError(f"{what}: cannot reach the cluster ({type(err).__name__}: {err})")


class Cluster:
    """Typed access to kubetune objects with one kubeconfig and namespace."""

    def __init__(self, kubeconfig: str | Path | None = None, namespace: str | None = None):
        from kubernetes import client, config

        self.kubeconfig = resolve_kubeconfig(kubeconfig)
        try:
            self.api = config.new_client_from_config(config_file=str(self.kubeconfig))
            _, context = config.list_kube_config_contexts(config_file=str(self.kubeconfig))
        except Exception as err:
            raise ClusterError(f"kubeconfig {self.kubeconfig} cannot be used: {err}") from None
        self.namespace = namespace or (context.get("context") or {}).get("namespace") or "default"
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise _api_error(err, what) from None

    # --- FineTuningJobs ------------------------------------------------------------------

    def create_job(self, job: FineTuningJob | dict[str, Any]) -> dict[str, Any]:
        body = job.to_api() if isinstance(job, FineTuningJob) else job
        body = {**body, "metadata": {**body.get("metadata", {}), "namespace": self.namespace}}
        body.pop("status", None)
        name = body["metadata"].get("name", "?")
        return self._call(
            f"creating FineTuningJob {name} in namespace {self.namespace}",
            self.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            JOBS,
            body,
        )

    def get_job(self, name: str) -> dict[str, Any]:
        return self._call(
            f"FineTuningJob {name!r} in namespace {self.namespace}",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            JOBS,
            name,
        )

    def list_jobs(
        self, label_selector: str | None = None, all_namespaces: bool = False
    ) -> list[dict[str, Any]]:
        kwargs = {"label_selector": label_selector} if label_selector else {}
        if all_namespaces:
            return self._call(
                "listing FineTuningJobs in all namespaces",
                self.custom.list_cluster_custom_object,
                GROUP,
                VERSION,
                JOBS,
                **kwargs,
            )["items"]
        return self._call(
            f"listing FineTuningJobs in namespace {self.namespace}",
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            JOBS,
            **kwargs,
        )["items"]

    def cancel_job(self, name: str) -> dict[str, Any]:
        return self._call(
            f"cancelling FineTuningJob {name!r} in namespace {self.namespace}",
            self.custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            JOBS,
            name,
            {"spec": {"cancel": True}},
        )

    def watch_job(self, name: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The job now, then each change (a watch, resumed until `timeout` seconds pass)."""
        return self._watch(JOBS, "FineTuningJob", name, timeout)

    def _watch(
        self, plural: str, kind: str, name: str, timeout: float | None
    ) -> Iterator[dict[str, Any]]:
        from kubernetes import watch

        deadline = None if timeout is None else time.monotonic() + timeout

        def list_fn(**kwargs: Any) -> Any:
            return self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, **kwargs
            )

        selector = f"metadata.name={name}"
        what = f"{kind} {name!r} in namespace {self.namespace}"
        listing = self._call(what, list_fn, field_selector=selector)
        if not listing["items"]:
            raise NotFound(f"{what} not found")
        yield listing["items"][0]
        version = listing["metadata"]["resourceVersion"]
        while deadline is None or time.monotonic() < deadline:
            remaining = 300 if deadline is None else max(1, int(deadline - time.monotonic()))
            try:
                stream = watch.Watch().stream(
                    list_fn,
                    field_selector=selector,
                    resource_version=version,
                    timeout_seconds=min(remaining, 300),
                )
                for event in stream:
                    obj = event["object"]
                    if event["type"] == "ERROR":  # e.g. 410 Gone: list again
                        listing = self._call(what, list_fn, field_selector=selector)
                        version = listing["metadata"]["resourceVersion"]
                        if listing["items"]:
                            yield listing["items"][0]
                        break
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "DELETED":
                        raise NotFound(f"{what} was deleted")
                    yield obj
                    if deadline is not None and time.monotonic() >= deadline:
                        return
            except ClusterError:
                raise
            except Exception as err:
                from kubernetes.client.exceptions import ApiException

                if isinstance(err, ApiException) and err.status == 410:
                    listing = self._call(what, list_fn, field_selector=selector)
                    version = listing["metadata"]["resourceVersion"]
                    continue
                raise _api_error(err, what) from None

    def wait_job(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The first state of the job that satisfies `predicate` (watching, no polling)."""
        last = None
        for obj in self.watch_job(name, timeout):
            last = obj
            if predicate(obj):
                return obj
        raise TimeoutError(
            f"FineTuningJob {name}: timed out after {timeout}s (phase "
            f"{((last or {}).get('status') or {}).get('phase', 'unknown')})"
        )

    # --- FineTuningSweeps -----------------------------------------------------------------

    def create_sweep(self, sweep: dict[str, Any]) -> dict[str, Any]:
        body = {**sweep, "metadata": {**sweep.get("metadata", {}), "namespace": self.namespace}}
        body.pop("status", None)
        name = body["metadata"].get("name", "?")
        return self._call(
            f"creating FineTuningSweep {name} in namespace {self.namespace}",
            self.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            SWEEPS,
            body,
        )

    def get_sweep(self, name: str) -> dict[str, Any]:
        return self._call(
            f"FineTuningSweep {name!r} in namespace {self.namespace}",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            SWEEPS,
            name,
        )

    def list_sweeps(self) -> list[dict[str, Any]]:
        return self._call(
            f"listing FineTuningSweeps in namespace {self.namespace}",
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            SWEEPS,
        )["items"]

    def watch_sweep(self, name: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The sweep now, then each change of it (its trial table included)."""
        return self._watch(SWEEPS, "FineTuningSweep", name, timeout)

    # --- ModelMerges ----------------------------------------------------------------------

    def create_merge(self, merge: dict[str, Any]) -> dict[str, Any]:
        body = {**merge, "metadata": {**merge.get("metadata", {}), "namespace": self.namespace}}
        body.pop("status", None)
        name = body["metadata"].get("name", "?")
        return self._call(
            f"creating ModelMerge {name} in namespace {self.namespace}",
            self.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            MERGES,
            body,
        )

    def get_merge(self, name: str) -> dict[str, Any]:
        return self._call(
            f"ModelMerge {name!r} in namespace {self.namespace}",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            MERGES,
            name,
        )

    def list_merges(self) -> list[dict[str, Any]]:
        return self._call(
            f"listing ModelMerges in namespace {self.namespace}",
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            MERGES,
        )["items"]

    def watch_merge(self, name: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The merge now, then each change of it."""
        return self._watch(MERGES, "ModelMerge", name, timeout)

    # --- pods and logs -------------------------------------------------------------------

    def trainer_pods(self, name: str) -> list[Any]:
        pods = self._call(
            f"listing pods of {name!r}",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=f"{JOB_NAME_LABEL}={name}",
        ).items
        pods = [
            p for p in pods if (p.metadata.annotations or {}).get(OWNER_ANNOTATION, name) == name
        ]
        # Training pods first, newest first; then the dataset validator.
        pods.sort(key=lambda p: p.metadata.creation_timestamp, reverse=True)
        pods.sort(key=lambda p: (p.metadata.labels or {}).get(COMPONENT_LABEL) != "trainer")
        return pods

    def logs(self, name: str, tail: int | None = None) -> tuple[str, str]:
        """(pod name, log text) of the job's latest trainer pod (else its validator)."""
        job = self.get_job(name)
        pods = self.trainer_pods(name)
        if not pods:
            raise NotFound(_no_pod(job))
        pod = pods[0]
        kwargs = {"tail_lines": tail} if tail else {}
        text = self._call(
            f"logs of pod {pod.metadata.name}",
            self.core.read_namespaced_pod_log,
            pod.metadata.name,
            self.namespace,
            **kwargs,
        )
        return pod.metadata.name, text

    # --- RegisteredModels ----------------------------------------------------------------

    def list_models(self) -> list[dict[str, Any]]:
        return self._call(
            f"listing RegisteredModels in namespace {self.namespace}",
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            MODELS,
        )["items"]

    def get_model(self, name: str) -> dict[str, Any]:
        return self._call(
            f"RegisteredModel {name!r} in namespace {self.namespace}",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            MODELS,
            name,
        )


def _no_pod(job: dict[str, Any]) -> str:
    """Why a job has no pod to show the log of, and where its log is kept once it ended."""
    meta, status = job["metadata"], job.get("status") or {}
    phase = status.get("phase", "Pending")
    if phase not in TERMINAL_PHASES:
        return f"FineTuningJob {meta['name']!r} has no trainer pod yet (phase {phase})"
    message = (
        f"FineTuningJob {meta['name']!r} ended ({phase}) and its pods are gone: a finished "
        "Job is removed with its pods after the operator's finished-job TTL."
    )
    try:
        output = FineTuningJobSpec.model_validate(job["spec"]).output
        where = output.job_location(meta["name"], meta["uid"])
        message += (
            f" The trainer's log is kept on the output volume: claim {where.claim_name}, "
            f"path {where.path}/{TRAINER_LOG_FILE} (beside metrics.json and the model)."
        )
    except (KeyError, ValueError):
        pass
    failure = status.get("failure") or {}
    if failure:
        message += f" It failed: {failure.get('reason', '')}: {failure.get('message', '')}"
    return message
