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


def plot_loss(
    train: Sequence[tuple[int, float]],
    evaluation: Sequence[tuple[int, float]],
    output: Path,
    title: str,
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as err:
        raise NoHistory(
            f"plotting needs matplotlib: pip install 'kubetune[plot]' ({err})"
        ) from None
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
