"""A loopback TCP proxy that hands each new connection to the next backend in turn, as a load balancer would.

Stands for the ingress in front of the replicas' notification endpoints: every connection (one HTTP request, since
the fake Graph does not keep connections alive) may reach any replica that is up. :meth:`RoundRobinProxy.stop` makes the
public endpoint unreachable (connection refused), :meth:`start` brings it back on the same port.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from types import TracebackType
from typing import Self


class RoundRobinProxy:
    def __init__(self, backends: list[tuple[str, int]], port: int, host: str = "127.0.0.1") -> None:
        self.address = (host, port)
        self._backends = itertools.cycle(backends)
        self._count = len(backends)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.connections = 0

    def start(self) -> Self:
        listener = socket.create_server(self.address, reuse_port=False)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        """To the next backend that accepts, as a load balancer skips a replica that is down or not up yet."""
        for _ in range(self._count):
            with self._lock:
                backend = next(self._backends)
            try:
                upstream = socket.create_connection(backend, timeout=5)
                break
            except OSError:
                continue
        else:
            client.close()  # no replica up: the caller sees the connection drop
            return
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(source, target), daemon=True).start()


def _pump(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        source.close()
