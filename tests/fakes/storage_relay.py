"""An HTTP relay in front of Azurite that counts every storage request and byte, and can hold a request.

The daemon talks to the relay as if it were the storage account (same connection string, another port), so what
the relay counts is exactly what graphsync sends and receives: requests by kind (``GET`` with ``comp=blocklist``,
ranged reads, ``PUT`` with ``comp=block``...) and bytes up and down, headers included. Counts do not drift with the
machine's load, which is why benchmarks and tests measure storage cost here.

:meth:`StorageRelay.hold` stops requests that match a predicate before they reach Azurite, so a test can kill a
process at an exact point of a protocol (say, after its blocks are staged and before the block list is committed)
and know the request never landed. :meth:`StorageRelay.answer` changes the status of Azurite's answers, where Azure
answers otherwise (a create-only PUT on an existing blob: Azurite 409, Azure 412).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from tests.fakes.azurite import AZURITE_ACCOUNT, AZURITE_KEY, Azurite

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass(frozen=True)
class Relayed:
    """One request as it crossed the relay."""

    method: str
    blob: str  # the path after the account, e.g. "graphsync/contoso/users/snapshot.jsonl"
    comp: str | None  # the `comp=` query parameter: block, blocklist, lease, metadata, ...
    ranged: bool
    status: int
    bytes_up: int  # request line, headers and body
    bytes_down: int  # status line, headers and body
    body_down: int  # the body alone: what a ranged read fetched


class Hold:
    """A request matching a predicate waits here until released (forwarded) or dropped (never forwarded)."""

    def __init__(self, predicate: Callable[[str, str, str | None], bool]) -> None:
        self.predicate = predicate
        self.arrived = threading.Event()
        self._decided = threading.Event()
        self._forward = False

    def release(self) -> None:
        self._forward = True
        self._decided.set()

    def drop(self) -> None:
        self._decided.set()

    def wait(self) -> bool:
        self.arrived.set()
        self._decided.wait(120)
        return self._forward


class StorageRelay:
    def __init__(self, azurite: Azurite) -> None:
        self._upstream = (azurite.host, azurite.port)
        self.direct_connection_string = azurite.connection_string  # around the relay: for checks, uncounted
        self._records: list[Relayed] = []
        self._holds: list[Hold] = []
        self._answers: list[tuple[Callable[[str, str, int], bool], int]] = []
        self._lock = threading.Lock()
        relay = self

        class Handler(_Handler):
            owner = relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StorageRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            holds, self._holds = self._holds, []
        for hold in holds:
            hold.drop()
        self._server.shutdown()
        self._server.server_close()

    @property
    def connection_string(self) -> str:
        host, port = self._server.server_address[:2]
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://{host}:{port}/{AZURITE_ACCOUNT};"
        )

    def hold(self, predicate: Callable[[str, str, str | None], bool]) -> Hold:
        """Hold requests for which ``predicate(method, blob, comp)`` is true (see :class:`Hold`)."""
        hold = Hold(predicate)
        with self._lock:
            self._holds.append(hold)
        return hold

    def answer(self, predicate: Callable[[str, str, int], bool], status: int) -> None:
        """From now on, answer ``status`` (same headers and body) where ``predicate(method, blob, Azurite's
        status)`` is true."""
        with self._lock:
            self._answers.append((predicate, status))

    def _answer_for(self, method: str, blob: str, status: int) -> int:
        with self._lock:
            return next((new for predicate, new in self._answers if predicate(method, blob, status)), status)

    def records(self) -> list[Relayed]:
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        with self._lock:
            self._records.clear()

    def _record(self, relayed: Relayed) -> None:
        with self._lock:
            self._records.append(relayed)

    def _hold_for(self, method: str, blob: str, comp: str | None) -> Hold | None:
        """The first hold matching this request, which it then leaves: a hold catches one request."""
        with self._lock:
            hold = next((h for h in self._holds if h.predicate(method, blob, comp)), None)
            if hold is not None:
                self._holds.remove(hold)
            return hold


class _Handler(BaseHTTPRequestHandler):
    owner: StorageRelay
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._relay()

    do_PUT = do_HEAD = do_DELETE = do_POST = do_GET

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        blob = unquote(url.path).removeprefix(f"/{AZURITE_ACCOUNT}/")
        comp = (parse_qs(url.query).get("comp") or [None])[0]
        hold = self.owner._hold_for(self.command, blob, comp)
        if hold is not None and not hold.wait():
            self.close_connection = True  # dropped: the client sees the connection close, Azurite nothing
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(*self.owner._upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            reply_headers = [
                (k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}
            ]
        finally:
            upstream.close()
        status = self.owner._answer_for(self.command, blob, response.status)
        self.send_response_only(status, response.reason if status == response.status else None)
        for key, value in reply_headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # a client that stopped reading (delta-rs may)
                self.close_connection = True
        up = len(self.requestline) + 2 + sum(len(k) + len(v) + 4 for k, v in self.headers.items()) + 2 + len(body)
        down = 15 + len(response.reason) + sum(len(k) + len(v) + 4 for k, v in reply_headers) + 2 + len(data)
        ranged = "Range" in self.headers or "x-ms-range" in self.headers
        self.owner._record(Relayed(self.command, blob, comp, ranged, status, up, down, len(data)))


def totals(records: Iterator[Relayed] | list[Relayed]) -> tuple[int, int, int]:
    """(requests, bytes up, bytes down)."""
    records = list(records)
    return len(records), sum(r.bytes_up for r in records), sum(r.bytes_down for r in records)
