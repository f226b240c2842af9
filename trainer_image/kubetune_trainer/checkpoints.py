"""Which checkpoint under <output>/checkpoints/ a run may resume from.

transformers' Trainer writes `checkpoint-<step>/` folders (weights, optimizer,
scheduler, gradient scaler, RNG states, trainer state; everything it reads
back is loaded with `weights_only=True` or from safetensors). Two things it
does not do, done here:

* a checkpoint is only complete once every process has written its part; the
  main process then writes `kubetune-checkpoint.json`, and a folder without it
  (a run killed mid-save) is never resumed from;
* the marker names the job that wrote it. A checkpoint another job left on a
  shared output path is refused, never loaded: its files are not ours to trust.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kubetune.api.trainer import JobIdentity
from kubetune_trainer.errors import InvalidConfig

MARKER = "kubetune-checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def job_key(job: JobIdentity) -> dict[str, str]:
    return {"namespace": job.namespace, "name": job.name, "uid": job.uid}


def write_marker(folder: Path, job: JobIdentity, step: int) -> None:
    partial = folder / f".{MARKER}.partial"
    partial.write_text(json.dumps({**job_key(job), "step": step}), encoding="utf-8")
    partial.replace(folder / MARKER)


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def resumable_checkpoint(root: Path, job: JobIdentity) -> Path | None:
    """The newest complete checkpoint this job wrote; InvalidConfig if another job's
    checkpoints are in the way."""
    if not root.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for folder in root.iterdir():
        match = _CHECKPOINT.match(folder.name)
        if not match or not folder.is_dir():
            continue
        marker = _read_marker(folder)
        if marker is None:
            continue  # incomplete: killed while saving
        if {k: marker.get(k) for k in job_key(job)} != job_key(job):
            raise InvalidConfig(
                f"the output folder holds checkpoints of another job "
                f"({marker.get('namespace')}/{marker.get('name')}, uid {marker.get('uid')!r}); "
                "give this job its own output.volume.path"
            )
        found.append((int(match.group(1)), folder))
    return max(found)[1] if found else None
