"""The notification endpoint alone: the handshake, verified notifications, and refusals that change nothing."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from graphsync.notify.directory import Directory
from graphsync.notify.endpoint import Notification, NotificationEndpoint
from graphsync.notify.records import Subscription, TenantRecord

TENANT = "contoso.onmicrosoft.com"
SECRET = "the-client-state-" + "x" * 40
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Endpoint:
    """A started endpoint that knows one subscription, and what it delivered."""

    def __init__(self) -> None:
        self.delivered: list[tuple[list[Notification], float]] = []
        self.refreshes: list[Callable[[], None]] = []  # each re-read asked for, and what ends it
        self.directory = Directory(self._refresh)
        record = TenantRecord(TENANT)
        record.subscriptions["users"] = Subscription("sub-1", "users", SECRET, 2e9, "u", "l", 0.0)
        self.directory.learn(record)
        self.server = NotificationEndpoint(
            "127.0.0.1",
            0,
            paths=("/graph/notifications", "/graph/notifications/lifecycle"),
            directory=self.directory,
            deliver=lambda notes, at: self.delivered.append((notes, at)),
            max_body_bytes=4096,
        )
        self.url = f"http://127.0.0.1:{self.server.address[1]}/graph/notifications"

    def _refresh(self, done: Callable[[], None]) -> None:
        self.refreshes.append(done)

    def post(self, body: bytes, *, url: str | None = None, method: str = "POST") -> tuple[int, str, Any]:
        request = urllib.request.Request(url or self.url, data=body, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with OPENER.open(request, timeout=5) as response:
                return response.status, response.read().decode(), response.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), exc.headers


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    served = Endpoint()
    served.server.start()
    yield served
    served.server.stop()


def _notification(client_state: str = SECRET, subscription: str = "sub-1", **extra: Any) -> bytes:
    item = {
        "subscriptionId": subscription,
        "clientState": client_state,
        "changeType": "updated",
        "resource": "Users/1",
        "tenantId": "t",
        "subscriptionExpirationDateTime": "2030-01-01T00:00:00.0000000Z",
    }
    return json.dumps({"value": [item | extra]}).encode()


def test_the_validation_handshake_echoes_the_decoded_token_as_plain_text(endpoint: Endpoint) -> None:
    token = "Validation: Testing client application reachability for subscription Request-Id: 42"
    status, body, headers = endpoint.post(b"", url=f"{endpoint.url}?validationToken={urllib.parse.quote(token)}")

    assert (status, body) == (200, token)
    assert headers.get_content_type() == "text/plain"
    assert endpoint.delivered == []


def test_a_verified_notification_is_accepted_with_202_and_delivered_with_its_time(endpoint: Endpoint) -> None:
    status, _, _ = endpoint.post(_notification())

    assert status == 202
    [(notes, received)] = endpoint.delivered
    assert [(n.entry.tenant, n.entry.job, n.event) for n in notes] == [(TENANT, "users", None)]
    assert received > 0


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"body": _notification(client_state="guessed")}, 403),  # wrong clientState
        ({"body": _notification() + b"]"}, 400),  # malformed JSON
        ({"body": b'{"value": [{"subscriptionId": "sub-1"}]}'}, 400),  # no clientState, no kind
        ({"body": b'{"value": "sub-1"}'}, 400),
        ({"body": b"x" * 5000}, 413),  # over max_body_bytes
        ({"body": b"", "url_suffix": "?validationToken=%3Cscript%3Ealert(1)%3C%2Fscript%3E"}, 400),  # forged
        ({"body": b"", "url_suffix": "?validationToken="}, 400),
        ({"body": _notification(), "method": "PUT"}, 405),
        ({"body": _notification(), "path": "/elsewhere"}, 404),
    ],
)
def test_anything_but_a_verified_notification_is_refused_and_changes_nothing(
    endpoint: Endpoint, request_kwargs: dict[str, Any], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    base = endpoint.url.rsplit("/graph/notifications", 1)[0] + request_kwargs.get("path", "/graph/notifications")
    url = base + request_kwargs.get("url_suffix", "")
    with caplog.at_level(logging.WARNING, logger="graphsync.notify.endpoint"):
        answer = endpoint.post(request_kwargs["body"], url=url, method=request_kwargs.get("method", "POST"))

    assert answer[0] == status
    assert endpoint.delivered == []
    assert SECRET not in caplog.text
    assert endpoint.post(_notification())[0] == 202, "the endpoint still serves"


def test_a_mixed_batch_with_one_forgery_is_refused_whole(endpoint: Endpoint) -> None:
    good = json.loads(_notification())["value"][0]
    forged = good | {"clientState": "nope"}

    status, _, _ = endpoint.post(json.dumps({"value": [good, forged]}).encode())

    assert status == 403
    assert endpoint.delivered == []


def test_an_unknown_subscription_is_retried_until_one_refresh_ends_then_refused(endpoint: Endpoint) -> None:
    """Another replica may have just created it: one re-read of the records and 503s (Graph redelivers) while it
    is under way, however many unknown ids come; an id still unknown after it ended is refused, and refusing it
    reads nothing more."""
    first = endpoint.post(_notification(subscription="sub-new"))
    during = [endpoint.post(_notification(subscription=f"sub-unknown-{n}"))[0] for n in range(5)]
    assert (first[0], first[2].get("Retry-After")) == (503, "2")
    assert during == [503] * 5, "a re-read is under way: ask Graph to come back, never refuse yet"
    assert len(endpoint.refreshes) == 1

    endpoint.refreshes[0]()  # the re-read ends without having found it
    assert endpoint.post(_notification(subscription="sub-new"))[0] == 403
    assert len(endpoint.refreshes) == 1
    assert endpoint.delivered == []


def test_a_subscription_the_refresh_finds_is_accepted_when_graph_delivers_again(endpoint: Endpoint) -> None:
    """The second subscription another replica created reaches this replica first: 503, then accepted."""
    assert endpoint.post(_notification(subscription="sub-2"))[0] == 503
    record = TenantRecord(TENANT)
    record.subscriptions["users"] = Subscription("sub-1", "users", SECRET, 2e9, "u", "l", 0.0)
    record.subscriptions["groups"] = Subscription("sub-2", "groups", SECRET, 2e9, "u", "l", 0.0)
    endpoint.directory.learn(record)
    endpoint.refreshes[0]()
    assert endpoint.post(_notification(subscription="sub-2"))[0] == 202
    assert len(endpoint.delivered) == 1


def test_a_client_that_sends_a_huge_length_gets_413_without_the_body_being_read(endpoint: Endpoint) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.server.address[1]), timeout=5) as conn:
        conn.sendall(b"POST /graph/notifications HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n{")
        answer = conn.recv(200)

    assert answer.startswith(b"HTTP/1.0 413")
    assert endpoint.delivered == []


def test_lifecycle_events_are_delivered_as_such(endpoint: Endpoint) -> None:
    body = json.loads(_notification())
    del body["value"][0]["changeType"]
    body["value"][0]["lifecycleEvent"] = "missed"

    status, _, _ = endpoint.post(json.dumps(body).encode(), url=endpoint.url + "/lifecycle")

    assert status == 202
    assert [n.event for n in endpoint.delivered[0][0]] == ["missed"]
