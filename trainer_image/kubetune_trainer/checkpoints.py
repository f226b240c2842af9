"""Checkpoints under <output>/checkpoints/step-<N>/, written atomically.

A checkpoint is written to a temporary folder and renamed into place once
complete, so a run killed mid-write never leaves a checkpoint that looks whole.
Only trainable weights are saved (the adapter, or every weight for FULL),
with the optimizer, scheduler, RNG states and loop position.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
KEEP_CHECKPOINTS = 2


@dataclass
class LoopState:
    """Where the training loop is; everything needed to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    real_tokens: int = 0  # non-padding tokens trained on
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().cpu().contiguous()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def save_checkpoint(root: Path, model, optimizer, scheduler, state: LoopState) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    partial = root / f".step-{state.step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file(trainable_state(model), str(partial / WEIGHTS_FILE))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(scheduler.state_dict(), partial / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, partial / "rng.pt")
    # The state file is written last: its presence marks the folder complete.
    (partial / STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _prune(root)
    return final


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _prune(root: Path) -> None:
    for _step, path in _complete_checkpoints(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    found = _complete_checkpoints(root)
    return found[-1][1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> LoopState:
    weights = load_file(str(path / WEIGHTS_FILE))
    parameters = dict(model.named_parameters())
    missing = [name for name, p in parameters.items() if p.requires_grad and name not in weights]
    if missing or any(name not in parameters for name in weights):
        raise RuntimeError(
            f"checkpoint {path} does not match the model (was the method or model changed?)"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor.to(parameters[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    raw = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    raw["loss_history"] = [tuple(item) for item in raw["loss_history"]]
    raw["eval_history"] = [tuple(item) for item in raw["eval_history"]]
    return LoopState(**raw)
