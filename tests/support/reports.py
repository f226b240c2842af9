"""What a trainer pod does to report: a token bound to its pod, posted to the operator."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from kubernetes import client

from kubetune.dev.processes import OperatorProcess
from tests.support.kube import Kube, wait_for

AUDIENCE = "kubetune-operator"


def pod_token(kube: Kube, namespace: str, pod_name: str, audience: str = AUDIENCE) -> str:
    """A token of the pod's ServiceAccount bound to the pod, as the kubelet projects it."""
    pod = kube.core.read_namespaced_pod(pod_name, namespace)
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=[audience],
            expiration_seconds=600,
            bound_object_ref=client.V1BoundObjectReference(
                kind="Pod", api_version="v1", name=pod_name, uid=pod.metadata.uid
            ),
        )
    )
    account = pod.spec.service_account_name or "default"
    return kube.core.create_namespaced_service_account_token(
        account, namespace, request
    ).status.token


def first_pod(kube: Kube, namespace: str, job_name: str, component: str) -> str:
    pod = wait_for(
        kube.core.list_namespaced_pod,
        lambda p: True,
        namespace=namespace,
        label_selector=f"kubetune.dev/job-name={job_name},app.kubernetes.io/component={component}",
        timeout=60,
        describe=f"a {component} pod of {job_name}",
    )
    return pod.metadata.name


def post(
    operator: OperatorProcess,
    namespace: str,
    name: str,
    documents: Any,
    token: str | None,
) -> tuple[int, dict]:
    """POST reports to the operator's endpoint; (HTTP status, JSON answer)."""
    body = json.dumps(documents).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"https://127.0.0.1:{operator.report_port}/v1/reports/{namespace}/{name}",
        data=body,
        headers=headers,
        method="POST",
    )
    context = ssl.create_default_context(cafile=operator.report_ca)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, {}
    except urllib.error.HTTPError as err:
        text = err.read().decode() or "{}"
        return err.code, json.loads(text)
