"""Reports to the operator (its report endpoint) or a local file, and the termination message.

A failure to report is logged and never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from kubetune.api.common import ApiModel
from kubetune.api.trainer import (
    REPORT_PROGRESS_KEY,
    REPORT_RESULT_KEY,
    REPORT_VALIDATION_KEY,
    REPORTS_PATH,
    TERMINATION_MESSAGE_MAX_BYTES,
    TERMINATION_MESSAGE_PATH,
    TRAINER_LOG_FILE,
    ErrorReport,
    ProgressReport,
    ReportEndpoint,
    ReportTarget,
    ResultReport,
    TrainerTermination,
    ValidationReport,
)

log = logging.getLogger(__name__)

# Progress is sent at most this often (the final one always goes out).
ENDPOINT_MIN_INTERVAL_S = 10.0
FILE_MIN_INTERVAL_S = 0.0
TERMINATION_PATH_ENV = "KUBETUNE_TERMINATION_MESSAGE_PATH"


def now() -> datetime:
    return datetime.now(UTC)


class EndpointSink:
    """POSTs reports to the operator over HTTPS with the pod's audience-bound token.

    The pod holds no rights in the cluster: the token only proves to the
    operator which pod is speaking. It is read again for every report, as the
    kubelet renews it in place.
    """

    TIMEOUT_S = 10.0

    def __init__(self, endpoint: ReportEndpoint, namespace: str, name: str) -> None:
        self.url = f"{endpoint.url.rstrip('/')}{REPORTS_PATH}/{namespace}/{name}"
        self.token_file = Path(endpoint.token_file)
        self.context = (
            ssl.create_default_context(cadata=endpoint.ca_pem) if endpoint.ca_pem else None
        )

    def write(self, key: str, document: str) -> None:
        token = self.token_file.read_text(encoding="utf-8").strip()
        body = json.dumps({key: json.loads(document)}).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=self.TIMEOUT_S, context=self.context):
            pass  # any answer but 2xx raises


class FileSink:
    """A local JSON file holding the same keys the endpoint receives, replaced atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, key: str, document: str) -> None:
        data = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                data = {}
        data[key] = json.loads(document)
        _atomic_write(self.path, json.dumps(data, indent=2))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temporary, path)


class Reporter:
    def __init__(self, target: ReportTarget, namespace: str, name: str) -> None:
        self.sinks: list[tuple[object, float]] = []
        if target.endpoint:
            self.sinks.append(
                (EndpointSink(target.endpoint, namespace, name), ENDPOINT_MIN_INTERVAL_S)
            )
        if target.file:
            self.sinks.append((FileSink(target.file), FILE_MIN_INTERVAL_S))
        self._last_sent: dict[int, float] = {}

    def _send(self, key: str, report: ApiModel, *, force: bool) -> None:
        document = report.model_dump_json(by_alias=True, exclude_none=True)
        for index, (sink, interval) in enumerate(self.sinks):
            now_s = time.monotonic()
            if not force and now_s - self._last_sent.get(index, -1e18) < interval:
                continue
            try:
                sink.write(key, document)
                self._last_sent[index] = now_s
            except Exception as err:  # reporting must never stop training
                log.warning("could not report %s to %s: %s", key, type(sink).__name__, err)

    def progress(self, report: ProgressReport, *, final: bool = False) -> None:
        self._send(REPORT_PROGRESS_KEY, report, force=final)

    def validation(self, report: ValidationReport) -> None:
        self._send(REPORT_VALIDATION_KEY, report, force=True)

    def result(self, report: ResultReport) -> None:
        self._send(REPORT_RESULT_KEY, report, force=True)


def termination_message_path() -> Path:
    return Path(os.environ.get(TERMINATION_PATH_ENV, TERMINATION_MESSAGE_PATH))


def write_termination(termination: TrainerTermination, path: Path | None = None) -> None:
    """Write the termination message, shortened to fit the kubelet's 4096 bytes."""
    path = path or termination_message_path()
    document = termination.model_dump_json(by_alias=True, exclude_none=True)
    if len(document.encode()) > TERMINATION_MESSAGE_MAX_BYTES:
        document = _shorten(termination)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(document, encoding="utf-8")
    except OSError as err:
        log.warning("could not write the termination message to %s: %s", path, err)


def _shorten(termination: TrainerTermination) -> str:
    termination = termination.model_copy(deep=True)
    if termination.validation is not None:
        termination.validation.steps = [s[:200] for s in termination.validation.steps[:8]]
    if termination.result is not None:
        termination.result.metrics = dict(list(termination.result.metrics.items())[:16])
        if termination.result.hyperparameters is not None:
            termination.result.hyperparameters.decisions = []
    if termination.error is not None:
        message = termination.error.message
        termination.error = ErrorReport(reason=termination.error.reason, message=message[:3000])
    document = termination.model_dump_json(by_alias=True, exclude_none=True)
    encoded = document.encode()
    if len(encoded) > TERMINATION_MESSAGE_MAX_BYTES and termination.error is not None:
        termination.error.message = termination.error.message[:1000] + " ..."
        document = termination.model_dump_json(by_alias=True, exclude_none=True)
    if len(document.encode()) > TERMINATION_MESSAGE_MAX_BYTES and termination.validation:
        termination.validation.steps = []
        document = termination.model_dump_json(by_alias=True, exclude_none=True)
    if len(document.encode()) > TERMINATION_MESSAGE_MAX_BYTES and termination.result:
        termination.result.hyperparameters = None  # the endpoint got them with the result
        document = termination.model_dump_json(by_alias=True, exclude_none=True)
    return document


def keep_log(output: Path) -> Path:
    """Copy the trainer's log to the output volume as well: the pod and its log go with
    the finished Job (its TTL), the volume stays. Appends, so a retried or resumed run
    adds to the same file. One such file per process: a later run's replaces it."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / TRAINER_LOG_FILE
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "kubetune_log", False)]:
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.kubetune_log = True
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return path
