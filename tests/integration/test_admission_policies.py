"""The admission policies on the real API server: a FineTuningJob gives its author
nothing they do not already have. Users of different rights are impersonated.

The generated policies are installed here under names of this test and bound to its
namespace only, so that nothing else in the session is checked by them (the chart's
own install is in test_chart).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.api import GROUP, VERSION, admission
from tests.support import finetuning as ft
from tests.support.kube import Kube, wait_for

pytestmark = pytest.mark.usefixtures("crds")

PARAMS = "allowed-images"
ALLOWED_IMAGE = "registry.example.com/ml/trainer:1.2"
OTHER_IMAGE = "docker.io/someone/miner:latest"


@pytest.fixture
def policies(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    renamed = []
    for policy in admission.policies():
        policy = copy.deepcopy(policy)
        policy["metadata"]["name"] = f"{policy['metadata']['name']}-{namespace}"
        renamed.append(policy)
    bindings = admission.bindings(
        namespace,
        PARAMS,
        prefix=f"test-{namespace}",
        namespace_selector={"matchLabels": {"kubernetes.io/metadata.name": namespace}},
    )
    for binding, policy in zip(bindings, renamed, strict=True):
        binding["spec"]["policyName"] = policy["metadata"]["name"]
    kube.core.create_namespaced_config_map(
        namespace, admission.allowed_images(namespace, PARAMS, ["registry.example.com/ml/"])
    )
    api = kube.admissionregistration
    for policy in renamed:
        api.create_validating_admission_policy(policy)
    for binding in bindings:
        api.create_validating_admission_policy_binding(binding)
    # In force, the image policy with its parameters, before any test runs.
    until_enforced(kube, namespace, job("probe", image=OTHER_IMAGE))
    # Left in place (they match only this namespace, which is deleted after the test):
    # on this API server, deleting the last policy whose parameters are ConfigMaps
    # left a policy created later with the same parameter kind without parameters
    # ("no params found") for minutes, which the chart test would trip over.
    return renamed


def grant(kube: Kube, namespace: str, user: str, secrets: list[str]) -> Kube:
    """`user` may write FineTuningJobs and ModelMerges in `namespace` and get only the
    named Secrets."""
    rules = [
        client.V1PolicyRule(
            api_groups=["kubetune.dev"],
            resources=["finetuningjobs", "modelmerges"],
            verbs=["create", "get", "list", "update", "patch"],
        )
    ]
    if secrets:
        rules.append(
            client.V1PolicyRule(
                api_groups=[""], resources=["secrets"], verbs=["get"], resource_names=secrets
            )
        )
    kube.rbac.create_namespaced_role(
        namespace, client.V1Role(metadata=client.V1ObjectMeta(name=user), rules=rules)
    )
    kube.rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name=user),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name=user
            ),
            subjects=[
                client.RbacV1Subject(kind="User", name=user, api_group="rbac.authorization.k8s.io")
            ],
        ),
    )
    return kube.impersonating(user)


def secret(kube: Kube, namespace: str, name: str) -> None:
    kube.core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data={"token": "hf_x"}),
    )


def job(name: str, **changes: Any) -> dict[str, Any]:
    body = ft.manifest(name)
    body["spec"] = ft.changed(body["spec"], **changes)
    return body


def refusal(create: Callable[[], Any]) -> str:
    """The API server's message for a refused request (the request must be refused)."""
    with pytest.raises(ApiException) as refused:
        create()
    assert refused.value.status == 403, refused.value.body
    return json.loads(refused.value.body)["message"]


def until_enforced(
    kube: Kube, namespace: str, body: dict[str, Any], timeout: float = 30, status: int = 403
) -> None:
    """New policies and parameters reach the API server's admission through its own
    informers, a moment after they are written; there is nothing to watch for that, so
    ask (a dry run) until the request is refused."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            kube.custom.create_namespaced_custom_object(
                ft.GROUP, ft.VERSION, namespace, ft.PLURAL, body, dry_run="All"
            )
        except ApiException as err:
            if err.status == status:
                return
            if not (err.status == 422 and "no params found" in err.body):
                raise
            # The binding reached admission before its parameters did: they follow.
        assert time.monotonic() < deadline, "the policy was never enforced"
        time.sleep(0.2)


def test_the_generated_policies_type_check_clean(kube: Kube, policies: list[dict]) -> None:
    for policy in policies:
        name = policy["metadata"]["name"]
        checked = wait_for(
            kube.admissionregistration.list_validating_admission_policy,
            lambda p: (
                p.status is not None
                and p.status.observed_generation == p.metadata.generation
                and p.status.type_checking is not None
            ),
            field_selector=f"metadata.name={name}",
            timeout=ft.TIMEOUT,
            describe=f"type check of {name}",
        )
        assert not checked.status.type_checking.expression_warnings, name


def test_a_job_may_name_only_secrets_its_author_may_get(
    kube: Kube, namespace: str, policies: list[dict]
) -> None:
    for name in ("alice-hub-token", "team-hub-token"):
        secret(kube, namespace, name)
    alice = grant(kube, namespace, "alice", ["alice-hub-token"])
    bob = grant(kube, namespace, "bob", [])
    team_token = {"name": "team-hub-token"}
    until_enforced(alice, namespace, job("probe", baseModel__tokenSecretRef=team_token))

    # Her own Secret, or none: accepted.
    ft.create(alice, namespace, job("own", baseModel__tokenSecretRef={"name": "alice-hub-token"}))
    ft.create(bob, namespace, job("no-secret"))

    # A Secret she may not read, in either field: refused, naming the field and the Secret.
    for field in ("baseModel", "dataset"):
        message = refusal(
            lambda f=field: ft.create(
                alice, namespace, job(f"team-{f.lower()}", **{f"{f}__tokenSecretRef": team_token})
            )
        )
        assert f"spec.{field}.tokenSecretRef: alice may not get Secret team-hub-token" in message
        assert f"in namespace {namespace}" in message
    assert "spec.baseModel.tokenSecretRef: bob may not get Secret alice-hub-token" in refusal(
        lambda: ft.create(
            bob, namespace, job("borrowed", baseModel__tokenSecretRef={"name": "alice-hub-token"})
        )
    )

    # Someone who may read it (the admin here) may name it...
    ft.create(kube, namespace, job("admins", dataset__tokenSecretRef=team_token))
    # ...and an update that keeps the reference passes whoever sends it.
    alice.custom.patch_namespaced_custom_object(
        ft.GROUP, ft.VERSION, namespace, ft.PLURAL, "admins", {"metadata": {"labels": {"a": "b"}}}
    )
    # Changing a reference to one she may not read is refused like a create.
    message = refusal(
        lambda: ft.patch_spec(
            alice, namespace, "own", {"baseModel": {"tokenSecretRef": team_token}}
        )
    )
    assert "spec.baseModel.tokenSecretRef: alice may not get Secret team-hub-token" in message


def test_an_explicit_trainer_image_must_be_on_the_allow_list(
    kube: Kube, namespace: str, policies: list[dict]
) -> None:
    alice = grant(kube, namespace, "alice", [])
    until_enforced(alice, namespace, job("probe", image=OTHER_IMAGE))

    ft.create(alice, namespace, job("allowed", image=ALLOWED_IMAGE))
    ft.create(alice, namespace, job("default-image"))  # the operator's image: not checked
    message = refusal(lambda: ft.create(alice, namespace, job("other", image=OTHER_IMAGE)))
    assert f"spec.image: {OTHER_IMAGE} is not an allowed trainer image" in message
    assert "registry.example.com/ml/" in message
    assert f"ConfigMap {namespace}/{PARAMS}" in message
    # A ModelMerge's image runs in its merge pod: the same list applies.
    merge = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelMerge",
        "metadata": {"name": "merge"},
        "spec": {
            "models": [{"model": "a"}, {"model": "b"}],
            "method": "ties",
            "output": {"volume": {"claimName": "models"}},
            "image": OTHER_IMAGE,
        },
    }
    message = refusal(
        lambda: alice.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "modelmerges", merge
        )
    )
    assert f"spec.image: {OTHER_IMAGE} is not an allowed trainer image" in message

    # The admin extends the list: the image is accepted from then on.
    kube.core.patch_namespaced_config_map(
        PARAMS,
        namespace,
        {"data": {admission.IMAGE_PREFIXES_KEY: "registry.example.com/ml/\ndocker.io/someone/\n"}},
    )
    deadline = time.monotonic() + 30
    while True:  # parameters reach admission through an informer too (see until_enforced)
        try:
            ft.create(alice, namespace, job("other", image=OTHER_IMAGE))
            break
        except ApiException as err:
            assert err.status == 403 and time.monotonic() < deadline, err.body
            time.sleep(0.2)

    # Without its parameters the policy fails closed: the API server resolves them
    # before anything else, so every create or update in the namespace is refused
    # (the operator itself writes only the status, which the policy does not check).
    kube.core.delete_namespaced_config_map(PARAMS, namespace)
    # (422: the API server's own answer for a binding without its parameters)
    until_enforced(alice, namespace, job("probe"), status=422)
    with pytest.raises(ApiException) as refused:
        ft.create(alice, namespace, job("no-list"))
    assert "no params found" in json.loads(refused.value.body)["message"]
