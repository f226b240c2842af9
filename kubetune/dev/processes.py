"""The operator and the node agent as processes of their own, for tests, benchmarks and the demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def python_env() -> dict[str, str]:
    """This process's environment, with the checkout's packages importable and no ambient KUBECONFIG."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "operator"), str(REPO / "trainer_image")]
    )
    env.pop("KUBECONFIG", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def start_node_agent(
    kubeconfig: Path, log_path: Path, *, name: str, root: Path, gpus: int = 1
) -> subprocess.Popen[bytes]:
    """`python -m kubetune.dev.node_agent`: a Node whose pods run as local processes."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubetune.dev.node_agent",
                "--kubeconfig",
                str(kubeconfig),
                "--name",
                name,
                "--root",
                str(root),
                "--gpus",
                str(gpus),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=python_env(),
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OperatorProcess:
    """`python -m kubetune_operator` with its log in a file; can be killed and started again.

    Its report endpoint listens on 127.0.0.1 with a certificate of a local CA, on a port
    chosen once: trainer pods started before a restart still reach it afterwards.
    """

    def __init__(self, kubeconfig: Path, log_path: Path, **settings: str) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.health_port = 0
        self.report_port = int(settings.get("report_port") or free_port())
        if "report_url" not in settings and self.report_port:
            from kubetune.dev.certs import local_certificates

            certs = local_certificates(log_path.parent / f"{log_path.stem}-certs")
            settings = {
                "report_url": f"https://127.0.0.1:{self.report_port}",
                "report_tls_cert": str(certs.cert),
                "report_tls_key": str(certs.key),
                "report_ca": str(certs.ca),
                **settings,
            }
        self.settings = {**settings, "report_port": str(self.report_port)}
        self.report_ca = self.settings.get("report_ca")

    def start(self, timeout: float = 60) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        args = [
            sys.executable,
            "-m",
            "kubetune_operator",
            "--kubeconfig",
            str(self.kubeconfig),
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(self.health_port),
        ]
        for flag, value in self.settings.items():
            # A boolean flag stands alone ("--leader-election"); the others take a value.
            args += [f"--{flag.replace('_', '-')}"] + ([] if value == "" else [value])
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=python_env()
            )
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"operator exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)  # process start-up: there is nothing to watch yet
        raise RuntimeError(f"operator not healthy after {timeout}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, like a crashed or evicted pod."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as response:
            return response.read().decode()
