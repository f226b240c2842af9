"""Run the operator: `kubetune operator` or `python -m kubetune_operator`."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import click
import kopf
from kubernetes import client, config

from kubetune_operator import handlers as _handlers  # noqa: F401  (registers the kopf handlers)
from kubetune_operator import metrics
from kubetune_operator.apiclient import OperatorApiClient
from kubetune_operator.cache import WATCHED_KINDS
from kubetune_operator.settings import OperatorSettings

ENV_PREFIX = "KUBETUNE_"


def settings_from_env(overrides: dict[str, Any] | None = None) -> OperatorSettings:
    """Settings from KUBETUNE_<FIELD> variables, then explicit overrides (flags)."""
    values: dict[str, Any] = {}
    for field in OperatorSettings.model_fields:
        raw = os.environ.get(ENV_PREFIX + field.upper())
        if raw is None:
            continue
        values[field] = (
            [n for n in raw.replace(",", " ").split() if n] if field == "namespaces" else raw
        )
    values.update({k: v for k, v in (overrides or {}).items() if v not in (None, (), [])})
    return OperatorSettings.model_validate(values)


def api_client(settings: OperatorSettings, connections: int) -> client.ApiClient:
    configuration = client.Configuration()
    if settings.kubeconfig:
        config.load_kube_config(config_file=settings.kubeconfig, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = connections
    return OperatorApiClient(configuration, settings.api_qps, settings.api_burst)


def run(settings: OperatorSettings) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kopf logs every handler call at INFO: one line per watch event, most of them
    # the echo of a status write. Its warnings and errors still show.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if settings.kubeconfig:
        # kopf's own login reads the same file.
        os.environ["KUBECONFIG"] = settings.kubeconfig
    metrics.serve(settings.metrics_port)
    ca_file = settings.report_ca or settings.report_tls_cert
    if ca_file and not settings.report_ca_pem:
        settings = settings.model_copy(update={"report_ca_pem": Path(ca_file).read_text()})
    memo = kopf.Memo(
        config=settings,
        # Reconciles on one pool, watches (each holds a connection) on another.
        api=api_client(settings, settings.workers * 2),
        watch_api=api_client(settings, WATCHED_KINDS * max(1, len(settings.namespaces)) + 2),
    )
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    asyncio.run(
        kopf.operator(
            registry=kopf.get_default_registry(),
            memo=memo,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            # Every replica watches (and queues keys); a Lease decides which one
            # reconciles (kubetune_operator.leader), not kopf's peering.
            standalone=True,
            liveness_endpoint=liveness,
        )
    )


@click.command("operator")
@click.option(
    "--namespace", "namespaces", multiple=True, help="Namespace to watch (repeat; default: all)."
)
@click.option("--trainer-image", help="Default trainer image.")
@click.option("--metrics-port", type=int, help="Port of /metrics (0 disables).")
@click.option("--health-port", type=int, help="Port of /healthz (0 disables).")
@click.option(
    "--leader-election/--no-leader-election",
    default=None,
    help="Elect one reconciling replica on a Lease (for several replicas).",
)
@click.option("--leader-election-id", help="Name of the leader-election Lease.")
@click.option("--leader-election-namespace", help="Namespace of the leader-election Lease.")
@click.option(
    "--leader-election-lease-seconds",
    type=int,
    help="Seconds without renewal after which a standby takes over.",
)
@click.option("--workers", type=int, help="Concurrent reconciles.")
@click.option("--report-port", type=int, help="Port of the report endpoint (0 disables).")
@click.option("--report-url", help="URL trainer pods reach the report endpoint at.")
@click.option("--report-audience", help="Audience of the tokens trainers report with.")
@click.option("--report-tls-cert", type=click.Path(exists=True, dir_okay=False))
@click.option("--report-tls-key", type=click.Path(exists=True, dir_okay=False))
@click.option("--report-ca", type=click.Path(exists=True, dir_okay=False))
@click.option("--api-qps", type=float, help="Requests per second to the API server (0: no limit).")
@click.option("--api-burst", type=int, help="Requests the operator may send at once.")
@click.option(
    "--image-pull-timeout",
    "image_pull_timeout_seconds",
    type=int,
    help="Seconds before an unpullable image fails a job.",
)
@click.option(
    "--finished-job-ttl",
    "finished_job_ttl_seconds",
    type=int,
    help="Seconds finished Jobs are kept.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False),
    help="Kubeconfig (default: in-cluster).",
)
def command(**flags: Any) -> None:
    """Run the kubetune operator (settings also from KUBETUNE_* variables)."""
    run(settings_from_env(flags))
