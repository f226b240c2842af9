"""Tiny models built offline once and cached, and helpers to write trainer configs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Bump when the builders in kubetune_trainer.tiny change, so stale caches are not reused.
TEST_MODELS_KEY = "tiny-v1"
CACHE_ROOT = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def _cached_model(kind: str) -> Path:
    from kubetune_trainer import tiny

    target = CACHE_ROOT / "test-models" / TEST_MODELS_KEY / kind
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{kind}-"))
    (tiny.build_causal if kind == "causal" else tiny.build_translation)(staging)
    try:
        staging.rename(target)
    except OSError:  # built concurrently by another session: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return _cached_model("causal")


@pytest.fixture(scope="session")
def translation_model_dir() -> Path:
    return _cached_model("translation")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
