"""kopf wiring: watches feed a work queue; workers run `reconcile` in threads.

kopf watches the FineTuningJobs; informers (kubetune_operator.cache) watch the
children with server-side label selectors. Handlers are thin on purpose: an
event about a FineTuningJob or any of its children updates the cache and
queues the job's key. Nothing is kept in handler return values or process
memory that the next run would need beyond what the watches rebuild: status
and the children themselves are the state.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from kubetune.api import GROUP, VERSION
from kubetune.api import finetuningjob as ftj
from kubetune.api import merge as mm
from kubetune.api import sweep as sw
from kubetune.api.trainer import REPORT_PROGRESS_KEY
from kubetune_operator import metrics, naming
from kubetune_operator.cache import Cache, slim
from kubetune_operator.leader import LeaderElector, default_identity
from kubetune_operator.merges import reconcile_merge
from kubetune_operator.reconcile import Blocked, Clients, Stale, reconcile
from kubetune_operator.reports import ReportEndpoint, ReportStore, TokenReviewer, server_tls
from kubetune_operator.reports import serve as serve_reports
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.sweeps import reconcile_sweep
from kubetune_operator.workqueue import CHANGED, NEW, Key, WorkQueue

log = logging.getLogger("kubetune.operator")


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: OperatorSettings = memo.config
    settings.posting.enabled = False  # we post our own events, one per transition
    settings.watching.server_timeout = 300
    settings.execution.max_workers = config.workers
    memo.queue = WorkQueue(on_depth=metrics.QUEUE_DEPTH.set)
    # Sweeps and merges have queues of their own: their looks never wait behind a
    # thousand jobs.
    memo.sweep_queue = WorkQueue()
    memo.merge_queue = WorkQueue()
    loop = asyncio.get_running_loop()

    def child_changed(kind: str, obj: dict, deleted: bool) -> None:  # informer threads
        namespace = obj["metadata"]["namespace"]
        if kind == "Workload":  # Kueue's, of a Job: its FineTuningJob is the Job's owner
            obj = _job_of_workload(memo.cache, obj) or {}
            kind = "Job"
        if (merge := _merge_of(kind, obj)) is not None:
            loop.call_soon_threadsafe(memo.merge_queue.add, (namespace, merge))
        elif (owner := _owner_of(kind, obj)) is not None:
            loop.call_soon_threadsafe(memo.queue.add, (namespace, owner))

    memo.cache = Cache(memo.watch_api, config.namespaces, child_changed)
    memo.reports = ReportStore()
    memo.clients = Clients(memo.api, memo.cache, memo.reports)
    memo.cache.start()
    memo.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="reconcile")
    memo.tasks = [asyncio.create_task(memo.queue.run_timers())]
    memo.elector = None
    if config.leader_election:
        memo.elector = LeaderElector(
            memo.clients.api,
            config.leader_election_namespace,
            config.leader_election_id,
            default_identity(),
            lease_seconds=config.leader_election_lease_seconds,
        )
        memo.tasks.append(asyncio.create_task(memo.elector.run()))
    memo.tasks += [asyncio.create_task(_worker(memo)) for _ in range(config.workers)]
    for queue, reconciler in (
        (memo.sweep_queue, reconcile_sweep),
        (memo.merge_queue, reconcile_merge),
    ):
        memo.tasks.append(asyncio.create_task(queue.run_timers()))
        memo.tasks.append(asyncio.create_task(_worker(memo, queue, reconciler)))
    memo.report_server = None
    memo.report_pacer = ReportPacer(memo.queue, config.report_status_interval_seconds)
    if config.report_port:
        endpoint = ReportEndpoint(
            memo.cache,
            memo.reports,
            TokenReviewer(memo.api, config.report_audience),
            memo.executor,
            memo.report_pacer,
            lambda: memo.elector is None or memo.elector.is_leader,
        )
        tls = server_tls(config.report_tls_cert, config.report_tls_key)
        memo.report_server = await serve_reports(endpoint, config.report_port, tls)


class ReportPacer:
    """Progress reaches the status at most once per `interval` per job; a validation
    or a result at once. Called by the report endpoint for every report."""

    def __init__(self, queue: WorkQueue, interval: float) -> None:
        self.queue, self.interval = queue, interval
        self.last: dict[Key, float] = {}

    def __call__(self, key: Key, kind: str) -> None:
        now = time.monotonic()
        wait = self.last.get(key, -self.interval) + self.interval - now
        if kind == REPORT_PROGRESS_KEY and wait > 0:
            self.queue.add_after(key, wait)
            return
        self.last[key] = now
        self.queue.add(key)

    def forget(self, key: Key) -> None:
        """The job is gone: so is its pace."""
        self.last.pop(key, None)


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account; otherwise the kubeconfig named by KUBECONFIG."""
    if not memo.config.kubeconfig:
        info = kopf.login_with_service_account(**kwargs)
        if info is not None:
            return info
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for task in getattr(memo, "tasks", []):
        task.cancel()
    if getattr(memo, "cache", None) is not None:
        memo.cache.stop()
    if getattr(memo, "report_server", None) is not None:
        await memo.report_server.cleanup()
    if getattr(memo, "elector", None) is not None:
        memo.elector.release()
    if getattr(memo, "executor", None):
        memo.executor.shutdown(wait=False, cancel_futures=True)


async def _worker(memo: kopf.Memo, queue=None, reconciler=None) -> None:
    queue: WorkQueue = queue or memo.queue
    reconciler = reconciler or reconcile
    clients: Clients = memo.clients
    config: OperatorSettings = memo.config
    elector: LeaderElector | None = memo.elector
    loop = asyncio.get_running_loop()
    # Decisions need the whole picture: no reconcile before every cache has listed.
    while not await loop.run_in_executor(memo.executor, clients.cache.wait_synced, 30):
        log.warning("watch caches not synced yet; waiting")
    while True:
        if elector is not None:
            await elector.leading.wait()  # a standby only queues keys
        key = await queue.get()
        if elector is not None and not elector.is_leader:
            elector.leading.clear()
            queue.done(key)
            queue.add(key)  # for whoever leads next here
            continue
        try:
            again = await loop.run_in_executor(memo.executor, reconciler, clients, config, *key)
        except Stale:
            queue.add(key)  # at once, from the fresh copy (runs after `done`)
        except Blocked as blocked:
            delay = queue.retry(key)
            log.info("%s/%s is blocked (%s); looking again in %.1fs", *key, blocked, delay)
        except (ApiException, HTTPError, OSError) as err:
            delay = queue.retry(key)
            metrics.RECONCILES.labels("error").inc()
            log.warning("reconcile %s/%s failed (%s); retrying in %.1fs", *key, _brief(err), delay)
        except Exception:
            delay = queue.retry(key)
            metrics.RECONCILES.labels("error").inc()
            log.exception("reconcile %s/%s crashed; retrying in %.1fs", *key, delay)
        else:
            queue.succeeded(key)
            if again is not None:
                queue.add_after(key, again)
        finally:
            queue.done(key)


def _brief(err: Exception) -> str:
    if isinstance(err, ApiException):
        return f"{err.status} {err.reason}"
    return type(err).__name__


def _enqueue(memo: kopf.Memo, key: Key, lane: int = CHANGED) -> None:
    queue: WorkQueue | None = getattr(memo, "queue", None)
    if queue is not None:
        queue.add(key, lane)


# The event handler is a coroutine on purpose: kopf runs plain functions in
# executor threads, and the work queue is an asyncio object of the event loop.
@kopf.on.event(GROUP, VERSION, ftj.PLURAL)
async def finetuningjob_changed(
    event: dict, name: str, namespace: str, memo: kopf.Memo, **_: Any
) -> None:
    cache: Cache | None = getattr(memo, "cache", None)
    if cache is None:
        return
    if event.get("type") == "DELETED":
        cache.forget(ftj.KIND, namespace, name)
        if (sweep := _sweep_of(dict(event["object"]))) is not None:
            memo.sweep_queue.add((namespace, sweep))
        memo.reports.forget(namespace, name)
        memo.report_pacer.forget((namespace, name))
        metrics.forget(namespace, name)
        return
    body = _cached(cache, event)
    sweep = _sweep_of(body)
    if sweep is not None:  # a trial: its sweep looks at every change, status included
        memo.sweep_queue.add((namespace, sweep))
    if not _own_status_write(event, body):
        _enqueue(memo, (namespace, name), NEW)


@kopf.on.event(GROUP, VERSION, sw.PLURAL)
async def sweep_changed(event: dict, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    cache: Cache | None = getattr(memo, "cache", None)
    if cache is None:
        return
    if event.get("type") == "DELETED":
        cache.forget(sw.KIND, namespace, name)
        return
    if not _own_status_write(event, _cached(cache, event)):
        memo.sweep_queue.add((namespace, name), NEW)


@kopf.on.event(GROUP, VERSION, mm.PLURAL)
async def merge_changed(event: dict, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    cache: Cache | None = getattr(memo, "cache", None)
    if cache is None:
        return
    if event.get("type") == "DELETED":
        cache.forget(mm.KIND, namespace, name)
        return
    if not _own_status_write(event, _cached(cache, event)):
        memo.merge_queue.add((namespace, name), NEW)


def _cached(cache: Cache, event: dict) -> dict:
    """The event's object, slimmed, into the cache (a copy: kopf keeps its own)."""
    body = slim(copy.deepcopy(dict(event["object"])))
    cache.put(body)
    return body


def _own_status_write(event: dict, body: dict) -> bool:
    """Our own status writes come back as events too: those need no look. New objects,
    the initial listing and spec changes (a new generation) do; the periodic resync
    covers the rest (a label added later, say)."""
    generation = body.get("metadata", {}).get("generation")
    seen = (body.get("status") or {}).get("observedGeneration")
    return event.get("type") == "MODIFIED" and generation == seen


def _sweep_of(trial: dict) -> str | None:
    """The FineTuningSweep a FineTuningJob is a trial of (its controller), if any."""
    if naming.LABEL_SWEEP_UID not in (trial["metadata"].get("labels") or {}):
        return None
    for ref in trial["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == sw.KIND:
            return ref.get("name")
    return None


def _job_of_workload(cache: Cache, workload: dict) -> dict | None:
    """The cached Job a Kueue Workload stands for (its controller), if it is one of ours."""
    meta = workload.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("controller"):
            return cache.get("Job", meta.get("namespace", ""), ref.get("name", ""))
    return None


def _merge_of(kind: str, obj: dict) -> str | None:
    """The ModelMerge a merge Job or its pod works for, if it is one."""
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(naming.LABEL_COMPONENT) != naming.COMPONENT_MERGER:
        return None
    if kind == "Pod":
        return (meta.get("annotations") or {}).get(naming.ANNOTATION_MERGE)
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == mm.KIND and ref.get("apiVersion", "").startswith(GROUP + "/"):
            return ref.get("name")
    return None


def _owner_of(kind: str, obj: dict) -> str | None:
    """The FineTuningJob a child belongs to (pods: by annotation, their owner is a Job)."""
    meta = obj.get("metadata") or {}
    if kind == "Pod":
        return (meta.get("annotations") or {}).get(naming.ANNOTATION_OWNER)
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == ftj.KIND and ref.get("apiVersion", "").startswith(GROUP + "/"):
            return ref.get("name")
    return None
