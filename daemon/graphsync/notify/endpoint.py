"""The HTTP endpoint Graph posts to: the validation handshake, verified notifications, and nothing else.

Graph's rules, as documented: a new subscription's URLs are validated with a POST carrying ``?validationToken=``,
to be echoed, URL-decoded, as ``text/plain`` with 200 within 10 seconds; a notification must be answered 2xx within
3 seconds, or Graph redelivers it (for up to 4 hours), so the handler only verifies and queues (202) and never
calls Graph or storage. A notification counts only if every item names a subscription this replica knows with its
``clientState``; anything else is refused with 4xx and has no effect. Plain HTTP: TLS ends at the ingress.
"""

from __future__ import annotations

import json
import logging
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from graphsync.metrics import NOTIFICATIONS_REJECTED
from graphsync.notify.directory import Directory, Entry, Refused

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 1024
RETRY_AFTER_SECONDS = 2
LIFECYCLE_EVENTS = frozenset({"reauthorizationRequired", "subscriptionRemoved", "missed"})


@dataclass(frozen=True)
class Notification:
    """One verified item of a delivery: a change (``event`` None) or a lifecycle event."""

    entry: Entry
    event: str | None


Deliver = Callable[[list[Notification], float], None]
"""Takes verified notifications and the time they came; must return at once (the handler waits for it)."""


class Rejection(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


class NotificationEndpoint:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        paths: tuple[str, ...],
        directory: Directory,
        deliver: Deliver,
        max_body_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._paths = frozenset(paths)
        self._directory = directory
        self._deliver = deliver
        self._max_body = max_body_bytes
        self._clock = clock
        self._server = _Server((host, port), _Handler, self)
        self.address = self._server.server_address
        self._thread = threading.Thread(target=self._server.serve_forever, name="notifications", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, request: _Handler) -> tuple[int, str, dict[str, str]]:
        """Status, plain-text body and headers for a POST; refusals are counted and logged (never a secret)."""
        received = self._clock()
        target = urlsplit(request.path)
        try:
            if target.path.rstrip("/") not in self._paths:
                raise Rejection(404, "path", "not a notification path")
            query = parse_qs(target.query, keep_blank_values=True)
            body = self._body(request)
            if "validationToken" in query:
                return 200, _validation_token(query["validationToken"]), {}
            notifications = self._verified(_items(body))
        except Rejection as refused:
            NOTIFICATIONS_REJECTED.labels(refused.reason).inc()
            level = logging.INFO if refused.status == 503 else logging.WARNING  # 503: expected, Graph redelivers
            log.log(level, "refused a request to the notification endpoint from %s: %s", request.client, refused)
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if refused.status == 503 else {}
            return refused.status, f"{refused}\n", headers
        self._deliver(notifications, received)
        return 202, "", {}

    def _body(self, request: _Handler) -> bytes:
        length_text = request.headers.get("Content-Length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            raise Rejection(400, "malformed", "Content-Length is not a number") from None
        if length > self._max_body:
            request.close_connection = True  # the rest of the body is never read
            raise Rejection(413, "too_large", f"body of {length} bytes is over the limit of {self._max_body}")
        return request.rfile.read(length) if length > 0 else b""

    def _verified(self, items: list[dict[str, Any]]) -> list[Notification]:
        """Every item verified, or a Rejection for the whole request: a genuine delivery never mixes in forgeries."""
        notifications, stale = [], False
        for item in items:
            verdict = self._directory.verify(item["subscriptionId"], item["clientState"])
            if verdict is Refused.MISMATCH:
                raise Rejection(403, "client_state", f"wrong clientState for subscription {item['subscriptionId']}")
            if verdict is Refused.UNKNOWN:
                raise Rejection(403, "unknown_subscription", f"unknown subscription {item['subscriptionId']}")
            if verdict is Refused.STALE:
                stale = True
                continue
            assert isinstance(verdict, Entry)
            notifications.append(Notification(verdict, item.get("lifecycleEvent")))
        if stale:
            raise Rejection(503, "unknown_subscription", "a subscription not known here yet; reading the records")
        return notifications


def _validation_token(values: list[str]) -> str:
    """The token to echo; a value Graph would never send (empty, long, markup, control characters) is refused."""
    token = values[0] if len(values) == 1 else ""
    if not 0 < len(token) <= MAX_TOKEN_CHARS or any(ch in "<>" or not ch.isprintable() for ch in token):
        raise Rejection(400, "validation", "not a validation token Graph would send")
    return token


def _items(body: bytes) -> list[dict[str, Any]]:
    """The ``value`` array of a changeNotificationCollection, each item with the fields verification needs."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejection(400, "malformed", f"body is not JSON ({type(exc).__name__})") from None
    items = document.get("value") if isinstance(document, dict) else None
    if not isinstance(items, list) or not items:
        raise Rejection(400, "malformed", "body has no 'value' array of notifications")
    for item in items:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("subscriptionId"), str)
            and isinstance(item.get("clientState"), str)
            and (isinstance(item.get("changeType"), str) or item.get("lifecycleEvent") in LIFECYCLE_EVENTS)
        ):
            raise Rejection(400, "malformed", "a notification lacks subscriptionId, clientState or its kind")
    return items


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], endpoint: NotificationEndpoint
    ) -> None:
        self.endpoint = endpoint
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which can stall startup on a bad resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that stalls mid-request must not hold a thread for long

    @property
    def client(self) -> str:
        return str(self.client_address[0])

    def do_POST(self) -> None:
        status, body, headers = self.server.endpoint.answer(self)
        self._reply(status, body, headers)

    def _refuse_method(self) -> None:
        NOTIFICATIONS_REJECTED.labels("method").inc()
        self._reply(405, "Graph posts notifications: use POST\n", {"Allow": "POST"})

    do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = _refuse_method

    def _reply(self, status: int, body: str, headers: dict[str, str]) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("notification endpoint: " + format, *args)
