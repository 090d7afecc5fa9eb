"""The daemon's HTTP endpoints: ``/metrics`` (prometheus-client's own handler), ``/healthz`` and ``/readyz``.

``/healthz`` answers whether the scheduler loop is still turning (a liveness probe restarts a hung daemon);
``/readyz`` whether configuration is loaded and the scheduler runs (a readiness probe holds traffic until then).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from prometheus_client import MetricsHandler

Probe = Callable[[], tuple[bool, str]]
"""Returns (healthy, a one-line reason)."""


class HealthServer:
    def __init__(self, host: str, port: int, *, live: Probe, ready: Probe) -> None:
        probes = {"/healthz": live, "/readyz": ready}

        class Handler(MetricsHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    super().do_GET()
                    return
                probe = probes.get(path)
                if probe is None:
                    self.send_error(404, "try /metrics, /healthz or /readyz")
                    return
                ok, reason = probe()
                body = f"{'ok' if ok else 'unhealthy'}: {reason}\n".encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
