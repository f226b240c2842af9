"""The operator under faults, in short: jobs keep coming while the leading replica is
SIGKILLed again and again, and the API server and etcd are restarted. Every job
ends Succeeded and registered once, nothing is created or trained twice, and no
finished job is ever seen running again. `python bench/chaos.py` is the long run.

On a cluster of its own: restarting the API server and etcd would disturb the
session's other tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.dev.cluster import LocalCluster
from tests.integration.conftest import REPO, TEST_CLUSTER_PREFIX
from tests.support.chaos import ChaosPlan, run_chaos, start_cluster

NAMESPACE = "chaos"
JOBS = 24


@pytest.fixture(scope="module")
def chaos_cluster() -> Iterator[LocalCluster]:
    cluster = start_cluster(
        f"{TEST_CLUSTER_PREFIX}{os.getpid()}-chaos", NAMESPACE, JOBS, REPO / "crds"
    )
    try:
        yield cluster
    finally:
        cluster.down()


def test_faults_under_load_lose_nothing_and_repeat_nothing(
    chaos_cluster: LocalCluster, tmp_path: Path
) -> None:
    plan = ChaosPlan(
        jobs=JOBS, kills=4, window_seconds=36, lease_seconds=4, seed=7, timeout_seconds=240
    )
    result = run_chaos(chaos_cluster, NAMESPACE, tmp_path, plan)
    print(result)
    counts = dict(result.counts)
    assert counts.pop("succeeded") == plan.jobs, (result, tmp_path)
    assert counts == dict.fromkeys(counts, 0), (result, tmp_path)
    assert result.kills == plan.kills
    assert result.restarts == ["kube-apiserver", "etcd"]
    assert result.takeovers >= 1  # a standby took the lease over from a killed leader
