"""Operator settings, from flags or KUBETUNE_* environment variables."""

from __future__ import annotations

from pydantic import BaseModel, Field

from kubetune import __version__

DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{__version__}"


class OperatorSettings(BaseModel):
    """How the operator runs. Every field can come from KUBETUNE_<FIELD> (upper case)."""

    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch (empty: all)."
    )
    trainer_image: str = Field(default=DEFAULT_TRAINER_IMAGE, description="Default trainer image.")
    image_pull_policy: str = Field(default="IfNotPresent", description="Trainer image pull policy.")
    validator_cpu: str = Field(default="1", description="CPU of the dataset-validation pod.")
    validator_memory: str = Field(
        default="4Gi", description="Memory of the dataset-validation pod."
    )
    finished_job_ttl_seconds: int = Field(
        default=86400,
        description="Delete finished training Jobs (and pods) after this; the FineTuningJob stays.",
    )
    image_pull_timeout_seconds: int = Field(
        default=300, description="Fail a job whose image cannot be pulled for this long."
    )
    termination_grace_seconds: int = Field(
        default=120, description="Time the trainer gets to checkpoint on SIGTERM."
    )
    resync_seconds: int = Field(default=60, description="Re-check every job at least this often.")
    workers: int = Field(default=8, description="Concurrent reconciles.")
    # A cap against a runaway operator, not the server's protection (API priority and
    # fairness answers 429, which is honoured): low enough for a shared API server,
    # high enough that a thousand new jobs are not held up by it.
    api_qps: float = Field(
        default=200.0, description="Requests per second to the API server (0: no limit)."
    )
    api_burst: int = Field(default=400, description="Requests the operator may send at once.")
    metrics_port: int = Field(default=8080, description="Port of /metrics (0 disables).")
    health_port: int = Field(default=8081, description="Port of /healthz (0 disables).")
    leader_election: bool = Field(
        default=False,
        description="Elect one reconciling replica on a Lease (several replicas for HA).",
    )
    leader_election_id: str = Field(
        default="kubetune-operator", description="Name of the leader-election Lease."
    )
    leader_election_namespace: str = Field(
        default="default", description="Namespace of the leader-election Lease."
    )
    leader_election_lease_seconds: int = Field(
        default=15,
        ge=3,
        description="A standby takes over when the leader has not renewed for this long "
        "(the leader renews every third of it).",
    )
    report_port: int = Field(
        default=8443, description="Port of the endpoint trainers report to (0 disables)."
    )
    report_url: str = Field(
        default="",
        description="URL trainer pods reach the report endpoint at (for example "
        "https://kubetune-operator.kubetune-system.svc:8443); empty: results only through "
        "termination messages, no live progress.",
    )
    report_audience: str = Field(
        default="kubetune-operator",
        description="Audience of the service-account tokens trainers report with.",
    )
    report_tls_cert: str | None = Field(
        default=None, description="TLS certificate file of the report endpoint."
    )
    report_tls_key: str | None = Field(default=None, description="Its private key file.")
    report_ca: str | None = Field(
        default=None,
        description="CA file trainers verify the endpoint with (default: the certificate).",
    )
    report_ca_pem: str | None = Field(
        default=None, description="The CA itself (read from report_ca at start)."
    )
    report_status_interval_seconds: float = Field(
        default=10.0, description="Write a job's progress to its status at most this often."
    )
    kubeconfig: str | None = Field(
        default=None, description="Kubeconfig path (unset: in-cluster or default)."
    )
