"""The trainer's report to the operator: HTTPS, its pod's token, one JSON object."""

from __future__ import annotations

import http.server
import json
import ssl
import threading

from kubetune_trainer.reporting import Reporter

from kubetune.api.trainer import ProgressReport, ReportEndpoint, ReportTarget
from kubetune.dev.certs import local_certificates


def test_reports_go_to_the_operator_with_the_pods_current_token(tmp_path) -> None:
    received: list[tuple[str, str, dict]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(length))
            received.append((self.path, self.headers["Authorization"], body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    certs = local_certificates(tmp_path / "certs")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        token = tmp_path / "token"
        token.write_text("first-token\n")
        endpoint = ReportEndpoint(
            url=f"https://127.0.0.1:{server.server_address[1]}/",
            token_file=str(token),
            ca_pem=certs.ca.read_text(),
        )
        reporter = Reporter(ReportTarget(endpoint=endpoint), "team-a", "run-1")
        progress = ProgressReport(
            step=1, total_steps=4, epoch=0.25, timestamp="2026-12-01T00:00:00Z"
        )
        reporter.progress(progress)
        token.write_text("renewed-token")  # the kubelet rotates it in place
        reporter.progress(progress.model_copy(update={"step": 4}), final=True)
    finally:
        server.shutdown()
    assert [(path, auth) for path, auth, _ in received] == [
        ("/v1/reports/team-a/run-1", "Bearer first-token"),
        ("/v1/reports/team-a/run-1", "Bearer renewed-token"),
    ]
    assert received[1][2]["progress"]["step"] == 4


def test_the_log_is_kept_on_the_output_volume_once_per_process(tmp_path) -> None:
    import logging

    from kubetune_trainer.reporting import keep_log

    first = keep_log(tmp_path / "first")
    logging.getLogger("kubetune_trainer").warning("step one")
    second = keep_log(tmp_path / "second")  # a later run's log replaces the first's
    logging.getLogger("kubetune_trainer").warning("step two")
    try:
        assert "step one" in first.read_text() and "step two" not in first.read_text()
        assert "step two" in second.read_text() and second.name == "trainer.log"
        kept = [h for h in logging.getLogger().handlers if getattr(h, "kubetune_log", False)]
        assert len(kept) == 1
    finally:
        for handler in kept:
            logging.getLogger().removeHandler(handler)
            handler.close()
