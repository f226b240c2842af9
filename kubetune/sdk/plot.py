"""Loss curves as PNG (matplotlib, from the `plot` extra)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


class NoHistory(Exception):
    pass


def load_history(source: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) loss histories from a run's metrics.json or its output folder."""
    path = source / "metrics.json" if source.is_dir() else source
    if not path.is_file():
        raise NoHistory(f"{source} holds no metrics.json (written when a run completes)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise NoHistory(f"{path} is not valid JSON: {err}") from None
    train = [(int(s), float(v)) for s, v in metrics.get("loss_history") or []]
    evaluation = [(int(s), float(v)) for s, v in metrics.get("eval_history") or []]
    if not train:
        raise NoHistory(f"{path} has no loss_history")
    return train, evaluation


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as err:
        raise NoHistory(
            f"plotting needs matplotlib: pip install 'kubetune[plot]' ({err})"
        ) from None
    return pyplot


def plot_loss(
    train: Sequence[tuple[int, float]],
    evaluation: Sequence[tuple[int, float]],
    output: Path,
    title: str,
) -> None:
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    axes.plot([s for s, _ in train], [v for _, v in train], label="train loss")
    if evaluation:
        axes.plot(
            [s for s, _ in evaluation], [v for _, v in evaluation], marker="o", label="eval loss"
        )
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png")
    pyplot.close(figure)


def plot_sweep(sweep: dict, output: Path) -> None:
    """A FineTuningSweep's objective against the trial number and against each searched
    parameter, one panel each; the best trial is marked."""
    pyplot = _pyplot()
    spec, status = sweep.get("spec") or {}, sweep.get("status") or {}
    metric = (spec.get("objective") or {}).get("metric", "objective")
    trials = [t for t in status.get("trials") or [] if t.get("objective") is not None]
    if not trials:
        raise NoHistory(f"sweep {sweep['metadata']['name']} has no trial with an objective yet")
    paths = [p["path"] for p in spec.get("parameters") or []]
    best = status.get("bestTrial")
    figure, axes = pyplot.subplots(
        1, 1 + len(paths), figsize=(4.2 * (1 + len(paths)), 3.8), dpi=100, squeeze=False
    )
    panels = axes[0]

    def draw(axis, xs, label, log=False):
        ys = [t["objective"] for t in trials]
        axis.scatter(xs, ys, color="tab:blue")
        for x, t in zip(xs, trials, strict=True):
            if t["name"] == best:
                axis.scatter([x], [t["objective"]], color="tab:red", s=90, label="best")
        axis.set_xlabel(label)
        axis.set_ylabel(metric)
        if log:
            axis.set_xscale("log")
        axis.grid(alpha=0.3)

    draw(panels[0], [t["number"] for t in trials], "trial")
    panels[0].legend()
    types = {p["path"]: p.get("type") for p in spec.get("parameters") or []}
    for axis, path in zip(panels[1:], paths, strict=True):
        values = [t.get("parameters", {}).get(path, "") for t in trials]
        numeric = types[path] != "categorical"
        xs = [float(v) for v in values] if numeric else values
        draw(axis, xs, path, log=types[path] == "logUniform")
    figure.suptitle(f"{sweep['metadata']['name']}: {metric}")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png")
    pyplot.close(figure)
