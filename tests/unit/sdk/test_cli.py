"""CLI commands that need no cluster: plot from a local run, and clear errors without one."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from kubetune.cli import main

REPO = Path(__file__).resolve().parents[3]


def test_plot_writes_a_png_from_a_local_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    history = [[step, 3.0 / step] for step in range(1, 21)]
    (run / "metrics.json").write_text(
        json.dumps({"loss_history": history, "eval_history": [[10, 0.5], [20, 0.3]]})
    )
    out = tmp_path / "loss.png"
    result = CliRunner().invoke(main, ["plot", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (20 steps)" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_history(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 1 and "has no loss_history" in result.output


def test_cluster_commands_without_kubeconfig(no_kubeconfig):
    for args in (["get", "x"], ["list"], ["models"], ["cancel", "x"], ["logs", "x"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, args
        assert "no kubeconfig: set KUBECONFIG or pass --kubeconfig" in result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["train", "-f", str(REPO / "examples/local/job.yaml")])
    assert result.exit_code == 1 and "no kubeconfig" in result.output
    result = CliRunner().invoke(
        main, ["train", "-f", str(REPO / "examples/local/job.yaml"), "--validate-only"]
    )
    assert result.exit_code == 1 and "need --local" in result.output
