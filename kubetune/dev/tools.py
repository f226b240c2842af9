"""Locate (and build on first use) the control-plane binaries from hack/."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-tools.sh"
KUEUE_BUILD_SCRIPT = REPO_ROOT / "hack" / "build-kueue.sh"
VERSIONS_FILE = REPO_ROOT / "hack" / "versions.env"


class ToolsError(RuntimeError):
    """The control-plane binaries could not be found or built."""


def pinned_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """The KEY=VALUE pins of hack/versions.env."""
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


@dataclass(frozen=True)
class Tools:
    """Paths of the binaries that make up the local cluster."""

    bin_dir: Path

    def __getitem__(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise ToolsError(f"{path} is missing: run hack/build-tools.sh")
        return path

    @property
    def kubectl(self) -> Path:
        return self["kubectl"]

    @property
    def kwokctl(self) -> Path:
        return self["kwokctl"]

    @property
    def helm(self) -> Path:
        return self["helm"]


def _run_build_script(script: Path) -> Path:
    """Run a hack/build-*.sh script and return the folder it prints on its last line."""
    if not script.is_file():
        raise ToolsError(
            "the local cluster is developer tooling: it needs a kubetune source checkout "
            f"(looked for {script})"
        )
    result = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise ToolsError(f"hack/{script.name} failed with exit code {result.returncode}")
    return Path(lines[-1])


def ensure_kueue() -> Path:
    """Kueue's folder (built on first use by hack/build-kueue.sh): the `kueue` binary,
    its CRDs under crds/ and its webhook manifests (webhook-manifests.yaml)."""
    return _run_build_script(KUEUE_BUILD_SCRIPT)


def ensure_tools() -> Tools:
    """Build whatever binary is missing (only the first time) and return their paths."""
    return Tools(_run_build_script(BUILD_SCRIPT))
