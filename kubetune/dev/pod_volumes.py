"""A pod's volumes for the development node agent: local folders and files.

Every volume becomes a local folder. PersistentVolumeClaims are their
PersistentVolume's `hostPath`; ConfigMaps, Secrets, downward-API and projected
volumes are written out as a kubelet writes them (keys or items, modes,
`key="value"` lines for labels and annotations, service-account tokens from
the TokenRequest API); anything else is a scratch folder.

A kubelet mounts `readOnly` volumes, and always ConfigMap, Secret, downward-API
and projected ones, read-only. The agent has no containers, so it runs the
process in a private mount namespace where each of those folders is
bind-mounted read-only onto itself: writes fail with EROFS for that pod only,
while another pod mounting the same folder writable keeps writing to it.
Where the machine allows no such namespace (no unshare, not permitted), the
agent says so once and every mount stays writable.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("kubetune.node-agent")

DEFAULT_MODE = 0o644
DEFAULT_TOKEN_SECONDS = 3600
ROOT_CA_CONFIG_MAP = "kube-root-ca.crt"
# A container's failure to start, as a kubelet reports it.
START_ERROR_EXIT_CODE = 128


def format_map(values: dict[str, str] | None) -> str:
    """Labels or annotations as a kubelet writes them: sorted `key="value"` lines.

    The kubelet quotes with Go's %q; JSON string quoting is the same for
    printable text.
    """
    return "\n".join(
        f"{key}={json.dumps(value, ensure_ascii=False)}"
        for key, value in sorted((values or {}).items())
    )


def field_value(pod: client.V1Pod, path: str) -> str:
    """A downward-API `fieldRef` of the pod's metadata, rendered as a kubelet does."""
    meta = pod.metadata
    maps = {"metadata.labels": meta.labels, "metadata.annotations": meta.annotations}
    keyed = re.fullmatch(r"(metadata\.(?:annotations|labels))\['([^']+)'\]", path)
    if keyed:
        return (maps[keyed.group(1)] or {}).get(keyed.group(2), "")
    if path in maps:
        return format_map(maps[path])
    plain = {
        "metadata.name": meta.name,
        "metadata.namespace": meta.namespace,
        "metadata.uid": meta.uid,
    }
    if path in plain:
        return plain[path]
    raise ValueError(f"the node agent does not support fieldRef {path!r}")


def _write(folder: Path, relative: str, content: str | bytes, mode: int) -> Path:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def _write_keys(
    folder: Path, data: dict[str, bytes], items: list[client.V1KeyToPath] | None, mode: int
) -> list[Path]:
    """ConfigMap or Secret keys: all of them, or the items' keys at the items' paths."""
    folder.mkdir(parents=True, exist_ok=True)
    if not items:
        return [_write(folder, key, value, mode) for key, value in data.items()]
    return [
        _write(folder, item.path, data[item.key], mode if item.mode is None else item.mode)
        for item in items
        if item.key in data
    ]


def rewrite(path: Path, transform: Callable[[str], str]) -> None:
    """Rewrite a written text file in place, whatever mode the pod asked for: the
    agent need not be root. Binary files are left as they are."""
    mode = path.stat().st_mode & 0o7777
    path.chmod(mode | 0o600)
    try:
        with contextlib.suppress(UnicodeDecodeError):
            path.write_text(transform(path.read_bytes().decode()))
    finally:
        path.chmod(mode)


@dataclass
class ApiAccess:
    """A projected volume with a token for the API server itself: the process's credentials."""

    volume: str
    token: Path
    ca: Path | None


@dataclass
class PodVolumes:
    """What the agent made of a pod's volumes."""

    folders: dict[str, Path] = field(default_factory=dict)
    # Mounted read-only whatever the mount says.
    read_only: set[str] = field(default_factory=set)
    # Files whose text may name container paths, to be rewritten to local folders.
    remappable: list[Path] = field(default_factory=list)
    api_access: list[ApiAccess] = field(default_factory=list)


class VolumeResolver:
    """Writes out a pod's volumes, reading what they refer to with the agent's client."""

    def __init__(self, core: client.CoreV1Api, ca_file: str | None) -> None:
        self.core = core
        self.ca_file = ca_file

    def resolve(self, pod: client.V1Pod, directory: Path) -> PodVolumes:
        result = PodVolumes()
        for volume in pod.spec.volumes or []:
            folder = directory / "volumes" / volume.name
            if volume.persistent_volume_claim:
                folder = self._claim_folder(volume, pod.metadata.namespace)
                if volume.persistent_volume_claim.read_only:
                    result.read_only.add(volume.name)
            elif volume.config_map:
                source = volume.config_map
                data = self._config_map(source.name, pod.metadata.namespace, source.optional)
                mode = _mode(source.default_mode)
                result.remappable += _write_keys(folder, data, source.items, mode)
            elif volume.secret:
                source = volume.secret
                data = self._secret(source.secret_name, pod.metadata.namespace, source.optional)
                _write_keys(folder, data, source.items, _mode(source.default_mode))
            elif volume.downward_api:
                source = volume.downward_api
                result.remappable += self._downward_api(
                    pod, folder, source.items, _mode(source.default_mode)
                )
            elif volume.projected:
                self._projected(pod, volume, folder, result)
            else:  # emptyDir and anything else: a scratch folder
                folder.mkdir(parents=True, exist_ok=True)
            if volume.config_map or volume.secret or volume.downward_api or volume.projected:
                # The kubelet writes these itself; the pod only ever reads them.
                result.read_only.add(volume.name)
            result.folders[volume.name] = folder
        return result

    def _claim_folder(self, volume: client.V1Volume, namespace: str) -> Path:
        claim = self.core.read_namespaced_persistent_volume_claim(
            volume.persistent_volume_claim.claim_name, namespace
        )
        pv = self.core.read_persistent_volume(claim.spec.volume_name)
        if not pv.spec.host_path:
            raise RuntimeError(f"volume {volume.name}: the node agent only mounts hostPath volumes")
        folder = Path(pv.spec.host_path.path)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def _read(read: Any, kind: str, name: str, namespace: str, optional: bool | None) -> Any:
        """The object, None when it is missing and optional; a missing required one is a
        start error, as a kubelet reports it."""
        try:
            return read(name, namespace)
        except ApiException as err:
            if err.status == 404 and optional:
                return None
            if err.status == 404:
                raise RuntimeError(f'{kind} "{name}" not found') from err
            raise

    def _config_map(self, name: str, namespace: str, optional: bool | None) -> dict[str, bytes]:
        config_map = self._read(
            self.core.read_namespaced_config_map, "configmap", name, namespace, optional
        )
        if config_map is None:
            return {}
        data = {key: value.encode() for key, value in (config_map.data or {}).items()}
        binary = config_map.binary_data or {}
        return data | {key: base64.b64decode(value) for key, value in binary.items()}

    def _secret(self, name: str, namespace: str, optional: bool | None) -> dict[str, bytes]:
        secret = self._read(self.core.read_namespaced_secret, "secret", name, namespace, optional)
        if secret is None:
            return {}
        return {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}

    @staticmethod
    def _downward_api(
        pod: client.V1Pod,
        folder: Path,
        items: list[client.V1DownwardAPIVolumeFile] | None,
        mode: int,
    ) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for item in items or []:
            if item.field_ref is None:
                raise RuntimeError(
                    f"downward API item {item.path}: the node agent supports fieldRef only"
                )
            value = field_value(pod, item.field_ref.field_path)
            written.append(
                _write(folder, item.path, value, mode if item.mode is None else item.mode)
            )
        return written

    def _projected(
        self, pod: client.V1Pod, volume: client.V1Volume, folder: Path, result: PodVolumes
    ) -> None:
        namespace = pod.metadata.namespace
        mode = _mode(volume.projected.default_mode)
        folder.mkdir(parents=True, exist_ok=True)
        tokens = []
        for source in volume.projected.sources or []:
            if source.service_account_token:
                projection = source.service_account_token
                token = self.token(pod, projection.audience, projection.expiration_seconds)
                path = _write(folder, projection.path, token, mode)
                if not projection.audience:
                    tokens.append(path)
            elif source.config_map:
                projection = source.config_map
                if projection.name == ROOT_CA_CONFIG_MAP and self.ca_file:
                    # The process reaches the API server as the agent does, so it
                    # trusts the agent's CA; the ConfigMap also reaches a new
                    # namespace only some time after the namespace itself.
                    data = {"ca.crt": Path(self.ca_file).read_bytes()}
                    _write_keys(folder, data, projection.items, mode)
                else:
                    data = self._config_map(projection.name, namespace, projection.optional)
                    result.remappable += _write_keys(folder, data, projection.items, mode)
            elif source.secret:
                projection = source.secret
                data = self._secret(projection.name, namespace, projection.optional)
                _write_keys(folder, data, projection.items, mode)
            elif source.downward_api:
                result.remappable += self._downward_api(
                    pod, folder, source.downward_api.items, mode
                )
            else:
                raise RuntimeError(
                    f"volume {volume.name}: the node agent projects service-account tokens, "
                    "ConfigMaps, Secrets and the downward API only"
                )
        ca = folder / "ca.crt"
        result.api_access += [
            ApiAccess(volume.name, token, ca if ca.is_file() else None) for token in tokens
        ]

    def token(self, pod: client.V1Pod, audience: str | None, seconds: int | None) -> str:
        """A token for the pod's service account, bound to the pod; no audience means
        the API server's own."""
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[audience] if audience else [],
                expiration_seconds=seconds or DEFAULT_TOKEN_SECONDS,
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid
                ),
            )
        )
        response = self.core.create_namespaced_service_account_token(
            pod.spec.service_account_name or "default", pod.metadata.namespace, request
        )
        return response.status.token


def _mode(mode: int | None) -> int:
    return DEFAULT_MODE if mode is None else mode


# --- read-only mounts ---------------------------------------------------------------


def bind_plan(
    mounts: Iterable[tuple[Path, bool]], writable: Iterable[Path] = ()
) -> list[tuple[Path, bool]]:
    """The bind mounts, as (folder, read-only), parents first, that make each read-only
    folder read-only and keep writable the writable folders that lie beneath one."""
    read_only = {path.resolve() for path, ro in mounts if ro}
    kept = {path.resolve() for path, ro in mounts if not ro} | {p.resolve() for p in writable}
    # Both mounts of one folder mounted both ways see the same local folder: it
    # cannot be read-only for one and not the other, so writes win.
    read_only -= kept
    plan = [(path, True) for path in read_only]
    plan += [(path, False) for path in kept if any(path.is_relative_to(ro) for ro in read_only)]
    return sorted(plan, key=lambda item: (len(item[0].parts), str(item[0])))


@dataclass(frozen=True)
class MountNamespace:
    """Starts a command in a private mount namespace with some folders bound read-only."""

    unshare: tuple[str, ...]
    shell: str
    mount: str

    def wrap(self, argv: list[str], plan: list[tuple[Path, bool]]) -> list[str]:
        """`argv` behind the bind mounts of `plan`; each step execs the next, so the
        process keeps the pid (and process group) it was started with."""
        if not plan:
            return argv
        mount = shlex.quote(self.mount)
        # --rbind, as container runtimes bind volumes: mounts below a folder stay
        # visible, and (as there) only the folder's own mount becomes read-only.
        script = (
            'while [ "$1" != -- ]; do '
            f'{mount} --rbind "$2" "$2" && {mount} -o "remount,bind,$1" "$2" "$2" || '
            '{ echo "node agent: cannot mount $2 ($1) in the pod\'s mount namespace" >&2; '
            f"exit {START_ERROR_EXIT_CODE}; }}; "
            'shift 2; done; shift; exec "$@"'
        )
        binds = [part for path, ro in plan for part in ("ro" if ro else "rw", str(path))]
        return [*self.unshare, "--", self.shell, "-c", script, "mounts", *binds, "--", *argv]


_probe_lock = threading.Lock()
_probed: list[MountNamespace | None] = []


def mount_namespace() -> MountNamespace | None:
    """How this machine can enforce read-only mounts, found once; None (after one
    warning) when it cannot, and pods then run with every mount writable."""
    with _probe_lock:
        if not _probed:
            _probed.append(_probe())
        return _probed[0]


def _probe() -> MountNamespace | None:
    unshare, shell, mount = shutil.which("unshare"), shutil.which("sh"), shutil.which("mount")
    if not (unshare and shell and mount):
        log.warning(
            "read-only volume mounts are NOT enforced: unshare, sh or mount is missing, "
            "so pods can write to volumes mounted readOnly"
        )
        return None
    reasons = []
    # Root creates a mount namespace directly; anyone else needs a user namespace too.
    for options in (
        ("--mount", "--propagation", "private"),
        ("--user", "--map-root-user", "--mount", "--propagation", "private"),
    ):
        candidate = MountNamespace((unshare, *options), shell, mount)
        reason = _try(candidate)
        if reason is None:
            return candidate
        reasons.append(f"unshare {' '.join(options)}: {reason}")
    log.warning(
        "read-only volume mounts are NOT enforced: pods can write to volumes mounted "
        "readOnly (cannot bind-mount read-only in a private mount namespace: %s)",
        "; ".join(reasons),
    )
    return None


def _try(candidate: MountNamespace) -> str | None:
    """Why the candidate does not enforce a read-only folder holding a writable one."""
    with tempfile.TemporaryDirectory(prefix="kubetune-mount-probe-") as tmp:
        read_only = Path(tmp) / "read-only"
        writable = read_only / "writable"
        writable.mkdir(parents=True)
        # `true`, not `:`: a failed redirection of a special built-in ends the shell.
        check = [candidate.shell, "-c", 'true > "$1/denied"; true > "$2/allowed"', "probe"]
        argv = candidate.wrap(
            [*check, str(read_only), str(writable)], bind_plan([(read_only, True)], [writable])
        )
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return str(err)
        if done.returncode != 0:
            return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        if (read_only / "denied").exists() or not (writable / "allowed").exists():
            return "the bind mounts did not take effect"
        return None


def executable(command: str, path: str | None) -> str:
    """The command as a kubelet's runtime finds it on the container's PATH; checked
    before starting, so a missing one fails the start rather than the process."""
    if "/" in command:
        return command
    found = shutil.which(command, path=path)
    if found is None:
        raise FileNotFoundError(
            errno.ENOENT, f'exec: "{command}": executable file not found in $PATH'
        )
    return found
