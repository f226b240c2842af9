"""The report endpoint: trainers POST their progress, validation and result here.

A trainer pod holds no rights in the cluster (no per-job ServiceAccount, Role,
RoleBinding or ConfigMap). It proves who it is with its projected
service-account token, whose audience is the operator's: the operator asks the
API server (TokenReview) whose token it is, and accepts the report only when
the pod the token is bound to is one of that FineTuningJob's pods, as Kubeflow
Trainer's progress proposal does. Reports are kept in memory until the next
reconcile folds them into the status: they are progress, and what must never
be lost (the result, a failure) also reaches the operator through the pod's
termination message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from aiohttp import web
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune.api import finetuningjob as ftj
from kubetune.api.trainer import (
    REPORT_KEYS,
    REPORT_PROGRESS_KEY,
    REPORT_RESULT_KEY,
    REPORT_VALIDATION_KEY,
    REPORTS_PATH,
    ProgressReport,
    ResultReport,
    ValidationReport,
)
from kubetune_operator import naming
from kubetune_operator.cache import Cache

log = logging.getLogger("kubetune.operator")

MODELS = {
    REPORT_PROGRESS_KEY: ProgressReport,
    REPORT_VALIDATION_KEY: ValidationReport,
    REPORT_RESULT_KEY: ResultReport,
}
MAX_BODY_BYTES = 256 * 1024
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class ReportStore:
    """The latest report of each kind per FineTuningJob (by UID: a job created again
    under the same name never sees the reports of the one before)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}

    def put(self, namespace: str, name: str, uid: str, key: str, document: str) -> None:
        with self._lock:
            owner, reports = self._reports.get((namespace, name), (uid, {}))
            if owner != uid:
                reports = {}
            self._reports[(namespace, name)] = (uid, {**reports, key: document})

    def get(self, namespace: str, name: str, uid: str) -> dict[str, str]:
        with self._lock:
            owner, reports = self._reports.get((namespace, name), (uid, {}))
            return dict(reports) if owner == uid else {}

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._reports.pop((namespace, name), None)


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    pod_name: str
    pod_uid: str


def identity_of(review: dict, audience: str) -> PodIdentity | None:
    """The pod a reviewed token is bound to, if the review accepts it for our audience."""
    status = review.get("status") or {}
    if not status.get("authenticated") or audience not in (status.get("audiences") or []):
        return None
    user = status.get("user") or {}
    username = user.get("username") or ""
    extra = user.get("extra") or {}
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    namespace = username[len(SERVICE_ACCOUNT_PREFIX) :].split(":", 1)[0]
    pod_name, pod_uid = (
        (extra.get(POD_NAME_EXTRA) or [""])[0],
        (extra.get(POD_UID_EXTRA) or [""])[0],
    )
    if not (namespace and pod_name and pod_uid):
        return None  # not bound to a pod: not a trainer's token
    return PodIdentity(namespace, pod_name, pod_uid)


class TokenReviewer:
    """TokenReviews with a short memory: a trainer reports every few seconds with the
    same token, and one review per token and few minutes is enough."""

    def __init__(self, api: client.ApiClient, audience: str, ttl_seconds: float = 300) -> None:
        self.authentication = client.AuthenticationV1Api(api)
        self.audience = audience
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[PodIdentity | None, float]] = {}

    def review(self, token: str) -> PodIdentity | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get(digest)
            if hit is not None and hit[1] > now:
                return hit[0]
        body = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience])
        )
        review = self.authentication.api_client.sanitize_for_serialization(
            self.authentication.create_token_review(body)
        )
        identity = identity_of(review, self.audience)
        # A refusal is remembered briefly only: the token may just be very new.
        ttl = self.ttl_seconds if identity else 10.0
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {k: v for k, v in self._seen.items() if v[1] > now}
            self._seen[digest] = (identity, now + ttl)
        return identity


class ReportEndpoint:
    """The aiohttp application behind `POST /v1/reports/{namespace}/{name}`."""

    def __init__(
        self,
        cache: Cache,
        reports: ReportStore,
        reviewer: TokenReviewer,
        executor: Executor,
        on_report: Callable[[tuple[str, str], str], None],
        is_leader: Callable[[], bool],
    ) -> None:
        self.cache, self.reports, self.reviewer = cache, reports, reviewer
        self.executor, self.on_report, self.is_leader = executor, on_report, is_leader

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(REPORTS_PATH + "/{namespace}/{name}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if not self.is_leader():
            # A standby does not reconcile: the trainer tries again with its next report.
            return _answer(503, "not the leading replica", {"Retry-After": "5"})
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _answer(401, "a bearer token is required")
        loop = asyncio.get_running_loop()
        try:
            identity = await loop.run_in_executor(self.executor, self.reviewer.review, token)
        except ApiException as err:
            log.warning("TokenReview failed: %s %s", err.status, err.reason)
            return _answer(503, "cannot review the token now", {"Retry-After": "5"})
        if identity is None:
            return _answer(401, "the token is not valid for this operator")
        job = self.cache.get(ftj.KIND, namespace, name)
        pod = self.cache.get("Pod", identity.namespace, identity.pod_name)
        uid = (job or {}).get("metadata", {}).get("uid")
        if (
            job is None
            or pod is None
            or identity.namespace != namespace
            or pod["metadata"].get("uid") != identity.pod_uid
            or (pod["metadata"].get("labels") or {}).get(naming.LABEL_JOB_UID) != uid
        ):
            log.warning(
                "refused a report for %s/%s from pod %s/%s",
                namespace,
                name,
                identity.namespace,
                identity.pod_name,
            )
            return _answer(403, "the token's pod does not work for this FineTuningJob")
        try:
            documents = await request.json()
        except (ValueError, web.HTTPRequestEntityTooLarge):
            return _answer(400, "the body must be a JSON object of at most 256 KiB")
        if not isinstance(documents, dict) or not documents or set(documents) - set(REPORT_KEYS):
            return _answer(400, f"the body's keys must be among {', '.join(REPORT_KEYS)}")
        try:
            parsed = {key: MODELS[key].model_validate(doc) for key, doc in documents.items()}
        except ValidationError as err:
            return _answer(400, f"invalid report: {err.errors()[:3]}")
        for key, report in parsed.items():
            self.reports.put(
                namespace, name, uid, key, report.model_dump_json(by_alias=True, exclude_none=True)
            )
            self.on_report((namespace, name), key)
        return web.Response(status=204)


def _answer(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"message": message}),
        content_type="application/json",
        headers=headers,
    )


def server_tls(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    if not cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file or None)
    return context


async def serve(endpoint: ReportEndpoint, port: int, tls: ssl.SSLContext | None) -> web.AppRunner:
    runner = web.AppRunner(endpoint.application(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port, ssl_context=tls).start()
    if tls is None:
        log.warning(
            "the report endpoint on port %d has no TLS certificate: tokens travel in clear "
            "text (acceptable only on a development machine)",
            port,
        )
    return runner
