"""Reports to the operator (report ConfigMap) or a local file, and the termination message.

A failure to report is logged and never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from kubetune.api.common import ApiModel
from kubetune.api.trainer import (
    REPORT_PROGRESS_KEY,
    REPORT_RESULT_KEY,
    REPORT_VALIDATION_KEY,
    TERMINATION_MESSAGE_MAX_BYTES,
    TERMINATION_MESSAGE_PATH,
    ErrorReport,
    ProgressReport,
    ReportTarget,
    ResultReport,
    TrainerTermination,
    ValidationReport,
)

log = logging.getLogger(__name__)

# Progress is sent at most this often (the final one always goes out).
CONFIG_MAP_MIN_INTERVAL_S = 10.0
FILE_MIN_INTERVAL_S = 0.0
TERMINATION_PATH_ENV = "KUBETUNE_TERMINATION_MESSAGE_PATH"


def now() -> datetime:
    return datetime.now(UTC)


class ConfigMapSink:
    """Patches keys of the job's report ConfigMap with the pod's service account."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self._api = None

    def _client(self):
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                # Not in a kubelet-run container (a development node agent, say):
                # the pod's service-account token comes in the file KUBECONFIG names.
                config.load_kube_config()
            self._api = client.CoreV1Api()
        return self._api

    def write(self, key: str, document: str) -> None:
        self._client().patch_namespaced_config_map(
            self.name, self.namespace, {"data": {key: document}}
        )


class FileSink:
    """A local JSON file holding the same keys as the report ConfigMap, replaced atomically."""

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
    def __init__(self, target: ReportTarget, namespace: str) -> None:
        self.sinks: list[tuple[object, float]] = []
        if target.config_map:
            self.sinks.append(
                (ConfigMapSink(target.config_map, namespace), CONFIG_MAP_MIN_INTERVAL_S)
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
        termination.result.hyperparameters = None  # the report ConfigMap still has them
        document = termination.model_dump_json(by_alias=True, exclude_none=True)
    return document
