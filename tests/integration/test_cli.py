"""The `kubetune` cluster commands against the real control plane and the operator."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from kubetune.cli import main
from tests.support import finetuning as ft
from tests.support.kube import Kube, wait_gone

pytestmark = pytest.mark.usefixtures("operator")


@pytest.fixture
def cli(kube: Kube, namespace: str):
    ft.create_volumes(kube, namespace)

    def invoke(*args: str):
        return CliRunner().invoke(
            main, ["--kubeconfig", str(kube.kubeconfig), "-n", namespace, *args]
        )

    return invoke


def test_train_watch_get_list_models(kube: Kube, namespace: str, cli, tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(ft.manifest("support-bot")))
    result = cli("train", "-f", str(path))
    assert result.exit_code == 0, result.output
    assert f"finetuningjob/support-bot created in namespace {namespace}" in result.output

    result = cli("watch", "support-bot", "--timeout", str(ft.TIMEOUT))
    assert result.exit_code == 0, result.output
    assert "support-bot succeeded; registered model: support-bot" in result.output

    result = cli("get", "support-bot")
    assert result.exit_code == 0, result.output
    assert "Succeeded" in result.output and "eval_loss: 1.5" in result.output
    assert "registered model: support-bot" in result.output
    result = cli("get", "support-bot", "-o", "json")
    assert json.loads(result.output)["status"]["phase"] == "Succeeded"
    result = cli("-o", "yaml", "get", "support-bot")
    assert yaml.safe_load(result.output)["metadata"]["name"] == "support-bot"

    result = cli("list")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split()[:3] == ["NAME", "PHASE", "METHOD"]
    assert "support-bot" in result.output and "kubetune/tiny-llama" in result.output
    assert [
        j["metadata"]["name"] for j in json.loads(cli("list", "-o", "json").output)["items"]
    ] == ["support-bot"]

    result = cli("list", "-A")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert any(
        line.split()[:2] == [namespace, "support-bot"] for line in result.output.splitlines()
    )
    everywhere = json.loads(cli("list", "--all-namespaces", "-o", "json").output)["items"]
    assert {(j["metadata"]["namespace"], j["metadata"]["name"]) for j in everywhere} >= {
        (namespace, "support-bot")
    }

    # Once the finished Job's pods are gone (its TTL), `logs` says where the log is kept.
    pods = kube.core.list_namespaced_pod(
        namespace, label_selector="kubetune.dev/job-name=support-bot"
    )
    for pod in pods.items:
        kube.core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
    wait_gone(
        kube.core.list_namespaced_pod,
        namespace=namespace,
        label_selector="kubetune.dev/job-name=support-bot",
        timeout=ft.TIMEOUT,
    )
    result = cli("logs", "support-bot")
    assert result.exit_code == 1
    assert "ended (Succeeded) and its pods are gone" in result.output
    uid = ft.get(kube, namespace, "support-bot")["metadata"]["uid"].split("-")[0]
    assert f"claim models, path out/support-bot-{uid}/trainer.log" in result.output

    result = cli("models")
    assert result.exit_code == 0, result.output
    assert "support-bot" in result.output and "adapter" in result.output
    models = json.loads(cli("models", "-o", "json").output)["items"]
    assert models[0]["spec"]["sourceJob"]["name"] == "support-bot"

    result = cli("plot", "support-bot", "-o", str(tmp_path / "loss.png"))
    assert (
        result.exit_code == 1 and "no loss history for FineTuningJob support-bot" in result.output
    )
    result = cli("cancel", "support-bot")
    assert result.exit_code == 1 and "already ended (Succeeded)" in result.output


def test_cancel(kube: Kube, namespace: str, cli) -> None:
    ft.create(kube, namespace, ft.manifest("long-run", outcome="run"))
    result = cli("cancel", "long-run", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"name": "long-run", "namespace": namespace, "cancel": True}
    ft.wait_phase(kube, namespace, "long-run", "Cancelled")
    result = cli("watch", "long-run")
    assert result.exit_code == 1 and "long-run was cancelled" in result.output


def test_helpful_errors(kube: Kube, namespace: str, cli, tmp_path, monkeypatch) -> None:
    result = cli("get", "nope")
    assert result.exit_code == 1
    assert f"FineTuningJob 'nope' in namespace {namespace} not found" in result.output
    assert "Traceback" not in result.output
    result = cli("logs", "nope")
    assert result.exit_code == 1 and "not found" in result.output

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: FineTuningJob\nmetadata: {name: x}\nspec: {method: LORAX}\n")
    result = cli("train", "-f", str(bad))
    assert result.exit_code == 1 and "is not a valid FineTuningJob" in result.output

    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 1
    assert "no kubeconfig: set KUBECONFIG or pass --kubeconfig" in result.output
    result = CliRunner().invoke(main, ["--kubeconfig", str(tmp_path / "none"), "list"])
    assert result.exit_code == 1 and "does not exist" in result.output
