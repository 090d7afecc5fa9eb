"""The loopback HTTPS server the fakes stand on: TLS from the test CA, started and stopped like an outage."""

from __future__ import annotations

import logging
import socketserver
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import trustme

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Knob(Generic[T]):
    """A setting a test changes while the fake's server threads read it: stored as ``_<name>`` on the fake and read
    and written under the fake's ``_lock``. ``check`` rejects a bad value before it is stored."""

    def __init__(self, doc: str = "", check: Callable[[T], None] | None = None) -> None:
        self.__doc__ = doc
        self._check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self._attribute = f"_{name}"

    def __get__(self, fake: Any, owner: type | None = None) -> T:
        if fake is None:
            return self  # type: ignore[return-value]  # the class attribute itself, for introspection
        with fake._lock:
            value: T = getattr(fake, self._attribute)
            return value

    def __set__(self, fake: Any, value: T) -> None:
        if self._check is not None:
            self._check(value)
        with fake._lock:
            setattr(fake, self._attribute, value)


class LoopbackHttpsServer:
    """Serves ``handler`` over TLS in a daemon thread; handlers reach the fake as ``self.server.fake``.

    :meth:`stop` closes the listening socket, so clients see connection refused (a real outage), and
    :meth:`start` binds the same port again.
    """

    def __init__(
        self, ca: trustme.CA, handler: type[BaseHTTPRequestHandler], *, name: str, host: str, port: int
    ) -> None:
        self.host = host
        self.port = port
        self._name = name
        self._handler = handler
        self._ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*dict.fromkeys([host, "localhost", "127.0.0.1"])).configure_cert(self._ssl_context)
        self._server: FakeHttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError(f"{self._name} is already running")
        server = FakeHttpServer((self.host, self.port), self._handler, self)
        # Handshake lazily in the handler thread so one slow client cannot block accept().
        server.socket = self._ssl_context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=self._name, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; afterwards connections are refused, as in an outage."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``https://HOST:PORT``."""
        if self.port == 0:
            raise RuntimeError(f"{self._name} has no port yet; call start() first")
        return f"https://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None


class FakeHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: Any) -> None:
        self.fake = fake
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can stall.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("%s: error serving %s", self.fake._name, client_address, exc_info=True)
