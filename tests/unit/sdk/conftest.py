"""The tiny causal model shared with the trainer tests (built once, cached)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.trainer.conftest import _cached_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return _cached_model("causal")


@pytest.fixture
def no_kubeconfig(monkeypatch, tmp_path):
    """No KUBECONFIG and no ~/.kube/config."""
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
