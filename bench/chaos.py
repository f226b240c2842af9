"""The operator under faults: 200 jobs while the operator is SIGKILLed, the API server
and etcd are restarted, and a standby replica takes the lease over.

On a fresh local cluster with simulated GPU nodes, two operator replicas with leader
election; jobs arrive over the run's first part while the leader (mostly; sometimes
the standby) is SIGKILLed at random moments and started again, the API server is
restarted once and etcd once. Watches kept for the whole run count what went wrong:
every count must be zero except the successes.

Run by hand or with `make bench-chaos`:
    python bench/chaos.py [--jobs 200] [--kills 10] [--window 150] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from tests.support.chaos import ChaosPlan, run_chaos, start_cluster  # noqa: E402

NAMESPACE = "chaos"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=10, help="operator SIGKILLs")
    parser.add_argument(
        "--window", type=float, default=150, help="seconds of submissions and faults"
    )
    parser.add_argument("--lease-seconds", type=int, default=5, help="leader-election lease")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    cluster = start_cluster("bench-chaos", NAMESPACE, args.jobs, REPO / "crds")
    logs = Path(tempfile.mkdtemp(prefix="kubetune-chaos-"))
    try:
        plan = ChaosPlan(
            jobs=args.jobs,
            kills=args.kills,
            window_seconds=args.window,
            lease_seconds=args.lease_seconds,
            seed=args.seed,
            timeout_seconds=args.window + 900,
        )
        result = run_chaos(cluster, NAMESPACE, logs, plan)
    finally:
        cluster.down()

    print(
        f"\n{plan.jobs} jobs in {result.wall_seconds:.0f} s; faults: {result.kills} operator "
        f"SIGKILLs, {result.takeovers} lease takeovers, restarts of {', '.join(result.restarts)}; "
        f"watches re-listed {result.relists} times; operator logs in {logs}\n"
    )
    width = max(len(k) for k in result.counts)
    for name, count in result.counts.items():
        print(f"  {name:<{width}}  {count:>5}")
    for regression in result.regressions[:20]:
        print(f"  regression: {regression}")
    wrong = {k: v for k, v in result.counts.items() if k != "succeeded" and v}
    return 1 if wrong or result.counts["succeeded"] != plan.jobs else 0


if __name__ == "__main__":
    sys.exit(main())
