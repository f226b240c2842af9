"""How the operator scales: N FineTuningJobs from creation to Job and to Succeeded.

For each N (default 100 and 1000) on a fresh local cluster with simulated GPU
nodes, it measures, in the same run:

* the ceiling: the API server creating N batch Jobs directly (no operator);
* with the operator: time until all N training Jobs exist, the per-job
  latency from FineTuningJob create to Job create (p50, p99), time until all N
  report Succeeded (validation skipped, 1 s simulated training, registration
  included), API requests the operator sent per job, and its peak memory.

Run by hand or with `make bench`: python bench/operator_scale.py [--sizes 100 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from _cluster_bench import (  # noqa: E402
    CREATE_THREADS,
    api_requests,
    fleet,
    peak_memory_mib,
    percentile,
    watch_until,
)

from kubetune.dev.cluster import LocalCluster  # noqa: E402
from kubetune.dev.processes import OperatorProcess  # noqa: E402
from tests.support import finetuning as ft  # noqa: E402
from tests.support.kube import Kube  # noqa: E402


def raw_job(name: str) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "suspend": True,  # the ceiling is the API server's, not the scheduler's
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "registry.invalid/x:1"}],
                }
            },
        },
    }


def measure_ceiling(kube: Kube, namespace: str, n: int) -> float:
    started = time.monotonic()
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(
            pool.map(
                lambda i: kube.batch.create_namespaced_job(namespace, raw_job(f"raw-{i}")), range(n)
            )
        )
    return time.monotonic() - started


def measure_ftj_ceiling(kube: Kube, namespace: str, n: int) -> float:
    """N FineTuningJobs created with no operator running (then deleted): the floor under
    "all Jobs exist", since a Job cannot be made for a FineTuningJob not yet stored."""
    body = ft.manifest("x", dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False})

    def create(i: int) -> None:
        ft.create(kube, namespace, {**body, "metadata": {"name": f"ceiling-{i:05d}"}})

    started = time.monotonic()
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(create, range(n)))
    elapsed = time.monotonic() - started
    kube.custom.delete_collection_namespaced_custom_object(
        ft.GROUP, ft.VERSION, namespace, ft.PLURAL
    )
    return elapsed


def run(
    n: int, nodes: int, workers: int, flags: dict[str, str], until_jobs: bool = False
) -> dict[str, float]:
    cluster = LocalCluster(f"bench-{n}")
    cluster.down()
    cluster.up()
    cluster.ensure_nodes(fleet(nodes))
    cluster.apply_crds(REPO / "crds")
    kube = Kube.from_kubeconfig(cluster.kubeconfig, connections=CREATE_THREADS * 2)
    for namespace in ("ceiling", "ceiling-ftj", "bench"):
        kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    ft.create_volumes(kube, "bench")

    ceiling = measure_ceiling(kube, "ceiling", n)
    ftj_ceiling = measure_ftj_ceiling(kube, "ceiling-ftj", n)

    log = Path(tempfile.mkdtemp()) / "operator.log"
    operator = OperatorProcess(cluster.kubeconfig, log, workers=str(workers), **flags)
    operator.start()
    try:
        requests_before = api_requests(operator)
        created_at: dict[str, float] = {}
        job_at: dict[str, float] = {}

        def note_job(name: str, _obj: object) -> None:
            owner = name.removesuffix("-train")
            job_at.setdefault(owner, time.monotonic())

        jobs_seen = threading.Thread(
            target=lambda: results.__setitem__(
                "jobs",
                watch_until(
                    kube.batch.list_namespaced_job,
                    n,
                    lambda _: True,
                    600,
                    note_job,
                    namespace="bench",
                ),
            )
        )
        succeeded = threading.Thread(
            target=lambda: results.__setitem__(
                "succeeded",
                watch_until(
                    ft.lister(kube, "bench"),
                    n,
                    lambda o: (o.get("status") or {}).get("phase") == "Succeeded",
                    1800,
                ),
            )
        )
        results: dict[str, float] = {}
        jobs_seen.start()
        if until_jobs:
            results["succeeded"] = float("nan")
        else:
            succeeded.start()

        def create(i: int) -> None:
            name = f"ftj-{i:05d}"
            body = ft.manifest(name, dataset={**ft.BASE_SPEC["dataset"], "validateFirst": False})
            created_at[name] = time.monotonic()
            ft.create(kube, "bench", body)

        started = time.monotonic()
        with ThreadPoolExecutor(CREATE_THREADS) as pool:
            list(pool.map(create, range(n)))
        created = time.monotonic() - started
        jobs_seen.join()
        if not until_jobs:
            succeeded.join()
        latencies = [job_at[name] - created_at[name] for name in created_at]
        requests = api_requests(operator) - requests_before
        breakdown = [
            line
            for line in operator.metrics().splitlines()
            if line.startswith(
                ("kubetune_operator_api_requests_total{", "kubetune_reconcile_total{")
            )
        ]
        print(f"N={n}: " + "; ".join(breakdown))
        peak, rss = peak_memory_mib(operator.process.pid)
    finally:
        operator.stop()
        cluster.down()
    return {
        "n": n,
        "ceiling_s": ceiling,
        "ftj_ceiling_s": ftj_ceiling,
        "create_s": created,
        "all_jobs_s": results["jobs"] - started,
        "all_succeeded_s": results["succeeded"] - started,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "requests_per_job": requests / n,
        "peak_mib": peak,
        "rss_mib": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--nodes", type=int, default=32, help="simulated 8-GPU nodes")
    parser.add_argument("--workers", type=int, default=8, help="operator reconcile workers")
    parser.add_argument("--api-qps", help="operator's request rate limit (default: its own)")
    parser.add_argument("--api-burst", help="operator's request burst (default: its own)")
    parser.add_argument(
        "--until-jobs",
        action="store_true",
        help="stop once the training Jobs exist (quicker; no Succeeded time, requests so far)",
    )
    args = parser.parse_args()
    flags = {k: v for k, v in (("api_qps", args.api_qps), ("api_burst", args.api_burst)) if v}
    rows = [run(n, args.nodes, args.workers, flags, args.until_jobs) for n in args.sizes]
    print()
    print(
        f"{'N':>6} {'ceiling':>9} {'ftj only':>9} {'ftj made':>9} {'jobs':>9} {'x ceiling':>9} {'succeeded':>10} "
        f"{'p50':>8} {'p99':>8} "
        f"{'req/job':>8} {'peak MiB':>9} {'RSS MiB':>8}"
    )
    for r in rows:
        print(
            f"{r['n']:>6} {r['ceiling_s']:>8.1f}s {r['ftj_ceiling_s']:>8.1f}s {r['create_s']:>8.1f}s {r['all_jobs_s']:>8.1f}s "
            f"{r['all_jobs_s'] / r['ceiling_s']:>8.2f}x "
            f"{r['all_succeeded_s']:>9.1f}s {r['p50_ms']:>6.0f}ms {r['p99_ms']:>6.0f}ms "
            f"{r['requests_per_job']:>8.1f} {r['peak_mib']:>9.0f} {r['rss_mib']:>8.0f}"
        )
    print(
        "\nceiling: the same N batch Jobs created directly on the same API server, "
        f"{CREATE_THREADS} client threads; ftj only: N FineTuningJobs created the same way with no "
        "operator running (the floor under jobs); ftj made: the N FineTuningJobs created the same way "
        "(while the operator works); jobs: until every FineTuningJob's training Job exists; "
        "succeeded: until every FineTuningJob is Succeeded (1 s simulated training, RegisteredModel created)."
    )


if __name__ == "__main__":
    main()
