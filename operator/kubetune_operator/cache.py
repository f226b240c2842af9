"""Watch caches: the operator reads what it reconciles from watches, not per reconcile.

kopf's label filters are applied by the client: its watches would carry every
Pod, Job and ConfigMap of the cluster. These informers ask the API server for
the operator's own objects only (a server-side label selector), keep the latest
copy of each, index children by the FineTuningJob UID they are labelled with,
and say which object changed so that its owner is reconciled. kopf has no
server-side selector to offer and the Python client has no informer, hence
this small one (list, then watch from the list's resourceVersion, relist on
410 Gone), modelled on client-go's reflector.

Writes go through too (`put` after a create or a status patch): the next
reconcile must not act on a copy older than what it wrote itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from kubetune.api import GROUP, VERSION
from kubetune.api import finetuningjob as ftj
from kubetune.api import merge as mm
from kubetune.api import registeredmodel as rm
from kubetune.api import sweep as sw
from kubetune_operator import naming

log = logging.getLogger("kubetune.operator")

Obj = dict
OnChange = Callable[[str, Obj, bool], None]  # (kind, object, deleted)

WATCH_SECONDS = 300
RETRY_SECONDS = 2.0
ABSENT_RETRY_SECONDS = 30.0


class Absent(Exception):
    """An optional kind is not served (404) or not readable (403)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _newer(candidate: Obj, current: Obj | None) -> bool:
    """Whether `candidate` is at least as recent as `current`. Resource versions are
    opaque strings; etcd's are integers, and only those are compared."""
    if current is None:
        return True
    new = candidate.get("metadata", {}).get("resourceVersion", "")
    old = current.get("metadata", {}).get("resourceVersion", "")
    if new.isdigit() and old.isdigit():
        return int(new) >= int(old)
    return True


_JOB_SPEC_KEPT = (
    "suspend",
    "activeDeadlineSeconds",
    "backoffLimit",
    "completionMode",
    "completions",
    "parallelism",
)


def _containers(pod_spec: Obj) -> Obj:
    return {
        "containers": [
            {"name": c.get("name"), "image": c.get("image")}
            for c in pod_spec.get("containers") or []
        ]
    }


def slim(obj: Obj) -> Obj:
    """What the operator keeps of an object (in place): what status derivation and
    planning read. A thousand jobs' pods as Python objects are hundreds of megabytes;
    managedFields, the trainer's configuration (an annotation) and the pod spec are
    most of them, and none of it is read back."""
    meta = obj.get("metadata") or {}
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations:
        annotations.pop(naming.ANNOTATION_TRAINER_CONFIG, None)
    kind, spec = obj.get("kind"), obj.get("spec")
    if kind == "Pod" and spec:
        obj["spec"] = _containers(spec)
    elif kind == "Workload" and spec:  # the pod sets are pod templates: not read back
        obj["spec"] = {k: spec[k] for k in ("active", "queueName") if k in spec}
    elif kind == "Job" and spec:
        template = (spec.get("template") or {}).get("spec") or {}
        obj["spec"] = {k: spec[k] for k in _JOB_SPEC_KEPT if k in spec} | {
            "template": {"spec": _containers(template)}
        }
    return obj


class Store:
    """Objects of one kind by (namespace, name), indexed by the job UID label."""

    def __init__(self, index_label: str = naming.LABEL_JOB_UID) -> None:
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], Obj] = {}
        self._by_uid: dict[tuple[str, str], set[str]] = {}
        self._index_label = index_label

    @staticmethod
    def _key(obj: Obj) -> tuple[str, str]:
        meta = obj["metadata"]
        return meta.get("namespace", ""), meta["name"]

    def _uid_of(self, obj: Obj) -> str | None:
        return (obj["metadata"].get("labels") or {}).get(self._index_label)

    def _index(self, key: tuple[str, str], obj: Obj | None, add: bool) -> None:
        uid = self._uid_of(obj) if obj is not None else None
        if uid is None:
            return
        names = self._by_uid.setdefault((key[0], uid), set())
        if add:
            names.add(key[1])
        else:
            names.discard(key[1])
            if not names:
                del self._by_uid[(key[0], uid)]

    def put(self, obj: Obj) -> bool:
        """Keep `obj` unless a newer copy is already here; whether it was kept."""
        key = self._key(obj)
        with self._lock:
            current = self._objects.get(key)
            if not _newer(obj, current):
                return False
            self._index(key, current, add=False)
            self._objects[key] = obj
            self._index(key, obj, add=True)
            return True

    def remove(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            current = self._objects.pop((namespace, name), None)
            self._index((namespace, name), current, add=False)
            return current

    def replace(self, objects: list[Obj], namespace: str | None) -> list[Obj]:
        """Swap in a fresh listing of one namespace (None: all); returns the objects gone."""
        fresh = {self._key(obj): obj for obj in objects}
        with self._lock:
            gone = [
                obj
                for key, obj in self._objects.items()
                if key not in fresh and (namespace is None or key[0] == namespace)
            ]
            for obj in gone:
                key = self._key(obj)
                del self._objects[key]
                self._index(key, obj, add=False)
            for key, obj in fresh.items():
                self._index(key, self._objects.get(key), add=False)
                self._objects[key] = obj
                self._index(key, obj, add=True)
        return gone

    def get(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def children(self, namespace: str, uid: str) -> list[Obj]:
        with self._lock:
            names = self._by_uid.get((namespace, uid), set())
            return [self._objects[(namespace, n)] for n in sorted(names)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)


@dataclass(frozen=True)
class Resource:
    """A kind the operator watches, and the server-side selector that narrows it."""

    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    label_selector: str | None = None
    # The label children are indexed by (their owner's UID).
    index_label: str = naming.LABEL_JOB_UID
    # Another project's kind (Kueue's Workloads): a cluster without its CRD, or an
    # operator without rights to it, simply has none.
    optional: bool = False

    def path(self, namespace: str | None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        scope = f"/namespaces/{namespace}" if namespace else ""
        return f"{base}{scope}/{self.plural}"


class Informer:
    """Keeps a Store of one Resource current, from a thread per watched namespace (or
    one for the whole cluster)."""

    def __init__(
        self,
        api: client.ApiClient,
        resource: Resource,
        namespaces: list[str],
        on_change: OnChange,
    ) -> None:
        self.api = api
        self.resource = resource
        self.namespaces: list[str | None] = list(namespaces) or [None]
        self.on_change = on_change
        self.store = Store(index_label=resource.index_label)
        self.synced = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._synced_scopes: set[str | None] = set()
        self._open: set[object] = set()
        self._absent_logged = False

    def start(self) -> None:
        for namespace in self.namespaces:
            threading.Thread(
                target=self._run,
                args=(namespace,),
                name=f"informer-{self.resource.plural}-{namespace or 'all'}",
                daemon=True,
            ).start()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            for response in list(self._open):
                with contextlib.suppress(Exception):
                    response.shutdown()  # unblocks the thread reading the stream

    def _get(self, namespace: str | None, query: dict[str, str], timeout: float):
        params = list(query.items())
        if self.resource.label_selector:
            params.append(("labelSelector", self.resource.label_selector))
        method, url, headers, body, post = self.api.param_serialize(
            method="GET",
            resource_path=self.resource.path(namespace),
            query_params=params,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, headers, body, post, _request_timeout=timeout)
        return response

    def _list(self, namespace: str | None) -> str:
        # resourceVersion=0: served from the API server's watch cache, not from etcd.
        response = self._get(namespace, {"resourceVersion": "0"}, 60)
        response.read()
        if self.resource.optional and response.status in (403, 404):
            self._mark_synced(namespace)  # none to see: nothing waits for it
            raise Absent(response.status)
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=response.reason)
        listing = json.loads(response.data)
        api_version = (
            f"{self.resource.group}/{self.resource.version}"
            if self.resource.group
            else self.resource.version
        )
        items = []
        for item in listing.get("items") or []:
            # Items of a list leave out their kind and apiVersion.
            item.setdefault("kind", self.resource.kind)
            item.setdefault("apiVersion", api_version)
            items.append(slim(item))
        for obj in self.store.replace(items, namespace):
            self.on_change(self.resource.kind, obj, True)
        for obj in items:
            self.on_change(self.resource.kind, obj, False)
        self._mark_synced(namespace)
        return listing.get("metadata", {}).get("resourceVersion", "")

    def _mark_synced(self, namespace: str | None) -> None:
        with self._lock:
            self._synced_scopes.add(namespace)
            if len(self._synced_scopes) == len(self.namespaces):
                self.synced.set()

    def _watch(self, namespace: str | None, resource_version: str) -> str | None:
        """Follow changes until the server ends the watch; returns the resourceVersion to
        resume from, or None when only a new list can resume (410 Gone)."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        response = self._get(namespace, query, WATCH_SECONDS + 30)
        raw = response.response
        with self._lock:
            self._open.add(raw)
        try:
            if response.status == 410:
                return None
            if not 200 <= response.status <= 299:
                raise ApiException(status=response.status, reason=response.reason)
            for line in watch.watch.iter_resp_lines(raw):
                if self._stopped.is_set():
                    break
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                meta = obj.get("metadata") or {}
                resource_version = meta.get("resourceVersion") or resource_version
                if kind == "BOOKMARK":
                    continue
                obj = slim(obj)
                if kind == "DELETED":
                    self.store.remove(meta.get("namespace", ""), meta["name"])
                    self.on_change(self.resource.kind, obj, True)
                elif self.store.put(obj):
                    self.on_change(self.resource.kind, obj, False)
            return resource_version
        finally:
            with self._lock:
                self._open.discard(raw)
            raw.release_conn()

    def _run(self, namespace: str | None) -> None:
        resource_version: str | None = None
        while not self._stopped.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list(namespace)
                resource_version = self._watch(namespace, resource_version)
            except Absent as absent:
                if not self._absent_logged:
                    log.info(
                        "%s are not served or not readable here (%s): looking again every %.0fs",
                        self.resource.plural,
                        absent.status,
                        ABSENT_RETRY_SECONDS,
                    )
                    self._absent_logged = True
                resource_version = None
                self._stopped.wait(ABSENT_RETRY_SECONDS)
            except (ApiException, HTTPError, OSError, ValueError) as err:
                if self._stopped.is_set():
                    return
                log.warning(
                    "watch of %s in %s failed (%s); listing again in %.0fs",
                    self.resource.plural,
                    namespace or "all namespaces",
                    getattr(err, "status", None) or type(err).__name__,
                    RETRY_SECONDS,
                )
                resource_version = None
                self._stopped.wait(RETRY_SECONDS)


MANAGED_SELECTOR = f"{naming.LABEL_MANAGED_BY}={naming.MANAGER}"
WATCHED = (
    Resource("Job", "batch", "v1", "jobs", MANAGED_SELECTOR),
    Resource("Pod", "", "v1", "pods", MANAGED_SELECTOR),
    # Any RegisteredModel may hold the name a job registers under: no selector.
    Resource(rm.KIND, GROUP, VERSION, rm.PLURAL),
    # Kueue's Workloads of Jobs (what the queue says of a training Job), by the Job's UID.
    Resource(
        "Workload",
        naming.KUEUE_GROUP,
        naming.KUEUE_VERSION,
        "workloads",
        naming.KUEUE_JOB_UID_LABEL,
        index_label=naming.KUEUE_JOB_UID_LABEL,
        optional=True,
    ),
)
WATCHED_KINDS = len(WATCHED)


class Cache:
    """Everything the reconcile reads: FineTuningJobs, sweeps and merges (fed by kopf's
    own watches of them) and, from the informers above, the operator's children and the
    RegisteredModels."""

    def __init__(self, api: client.ApiClient, namespaces: list[str], on_change: OnChange) -> None:
        # FineTuningJobs indexed by the sweep they are trials of; sweeps fed by kopf too.
        self.finetuningjobs = Store(index_label=naming.LABEL_SWEEP_UID)
        self.sweeps = Store()
        self.merges = Store()
        self.informers = {r.kind: Informer(api, r, namespaces, on_change) for r in WATCHED}

    def start(self) -> None:
        for informer in self.informers.values():
            informer.start()

    def stop(self) -> None:
        for informer in self.informers.values():
            informer.stop()

    def wait_synced(self, timeout: float) -> bool:
        return all(i.synced.wait(timeout) for i in self.informers.values())

    def store(self, kind: str) -> Store:
        if kind == ftj.KIND:
            return self.finetuningjobs
        if kind == sw.KIND:
            return self.sweeps
        if kind == mm.KIND:
            return self.merges
        return self.informers[kind].store

    def children(self, kind: str, namespace: str, uid: str) -> list[Obj]:
        return self.store(kind).children(namespace, uid)

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.store(kind).get(namespace, name)

    def put(self, obj: Obj) -> None:
        """A write's answer: the object as it now is."""
        self.store(obj["kind"]).put(slim(obj))

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self.store(kind).remove(namespace, name)
