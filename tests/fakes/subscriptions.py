"""Graph's change-notification subscriptions on the fake Graph: ``/v1.0/subscriptions`` and webhook delivery.

As Microsoft Graph documents them (the subscription resource, webhooks delivery, lifecycle notifications):

* ``POST /v1.0/subscriptions`` -- ``users`` or ``groups``, ``changeType`` of ``updated``/``deleted`` (what
  directory resources support), an ``expirationDateTime`` at most :attr:`FakeSubscriptions.max_lifetime_seconds`
  ahead (41,760 minutes), a ``clientState`` of at most 128 characters. Before answering 201, the notification URL
  and the lifecycle URL are validated: a POST with ``?validationToken=...`` that must be answered 200, ``text/plain``,
  with the token, within 10 s; otherwise 400 and no subscription.
* ``PATCH /v1.0/subscriptions/{id}`` -- a new ``expirationDateTime`` (renewal); ``DELETE`` -- 204;
  ``GET /v1.0/subscriptions`` -- the calling tenant's. An unknown (or expired) id is a 404.

Every change the fake records in a subscribed collection (any change-log entry, as a delta round would report it)
is posted to the subscription's notification URL as a ``changeNotificationCollection``: ``updated`` (creations
included, as for users and groups) or ``deleted``, with the subscription's ``clientState``. Knobs make deliveries
batched (:attr:`batch`), duplicated (:attr:`duplicate`) or late (:attr:`delay_seconds`). A delivery that is not
answered 2xx within 3 s is retried with backoff for :attr:`retry_for_seconds` (Graph: up to 4 hours), then dropped.
A subscription not renewed in time expires (recorded in :attr:`lapsed`); :meth:`send_lifecycle` and :meth:`remove`
send lifecycle notifications. Times come from :attr:`clock`, which a test may replace to simulate a month.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from graphsync.timestamps import TICKS_PER_SECOND, graph_ticks, graph_time

if TYPE_CHECKING:
    from tests.fakes.graph import FakeGraph

logger = logging.getLogger(__name__)

MAX_LIFETIME_SECONDS = 41760 * 60
RESOURCES = {"users": "#Microsoft.Graph.User", "groups": "#Microsoft.Graph.Group"}
CHANGE_TYPES = frozenset({"updated", "deleted"})
DELIVERY_TIMEOUT = 3.0  # Graph's HTTP client gives up after 3 s
VALIDATION_TIMEOUT = 10.0
WATCH_SECONDS = 0.02
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy from env


class SubscriptionError(Exception):
    """Becomes a Graph error reply."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _Subscription:
    id: str
    tenant: str  # tenant GUID
    resource: str
    change_types: frozenset[str]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expires: float
    seen: int  # change-log position delivered so far

    def rendered(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "resource": self.resource,
            "applicationId": "00000000-0000-0000-0000-00000000f4ce",
            "changeType": ",".join(sorted(self.change_types)),
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": graph_time(int(self.expires * TICKS_PER_SECOND)),
            "latestSupportedTlsVersion": "v1_2",
        }


@dataclass(frozen=True)
class Delivery:
    """One POST to a notification URL: when, where, how many items, and the answer (None: no answer)."""

    time: float
    url: str
    items: int
    status: int | None


@dataclass(order=True)
class _Outgoing:
    due: float
    seq: int
    url: str = field(compare=False)
    items: list[dict[str, Any]] = field(compare=False)
    first: float = field(compare=False)
    tries: int = field(default=0, compare=False)


class FakeSubscriptions:
    def __init__(self, graph: FakeGraph) -> None:
        self._graph = graph
        self._lock = threading.Condition()
        self._subscriptions: dict[str, _Subscription] = {}
        self._outbox: list[_Outgoing] = []
        self._seq = itertools.count()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.clock: Callable[[], float] = time.time
        self.max_lifetime_seconds = MAX_LIFETIME_SECONDS
        self.batch = 20
        self.duplicate = False
        self.delay_seconds = 0.0
        self.retry_for_seconds = 30.0
        self.deliveries: list[Delivery] = []
        self.lapsed: list[str] = []
        self.validations = 0

    # -- what tests use ------------------------------------------------------------------

    def active(self) -> list[dict[str, Any]]:
        """Live subscriptions (expired ones are gone), rendered as Graph would, plus ``tenant``."""
        with self._lock:
            self._expire()
            return [sub.rendered() | {"tenant": sub.tenant} for sub in self._subscriptions.values()]

    def send_lifecycle(self, subscription_id: str, event: str) -> None:
        """Post a lifecycle notification (``reauthorizationRequired``, ``subscriptionRemoved``, ``missed``)."""
        with self._lock:
            sub = self._subscriptions[subscription_id]
            if event == "subscriptionRemoved":
                del self._subscriptions[subscription_id]
            item = {
                "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": graph_time(int(sub.expires * TICKS_PER_SECOND)),
                "tenantId": sub.tenant,
                "clientState": sub.client_state,
                "lifecycleEvent": event,
            }
            self._queue(sub.lifecycle_url or sub.notification_url, [item])

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._lock.notify_all()

    # -- the API -------------------------------------------------------------------------

    def answer(self, method: str, rest: list[str], body: bytes, tenant: str) -> tuple[int, dict[str, Any] | None]:
        with self._lock:
            self._expire()
        if not rest and method == "POST":
            return 201, self._create(_json_body(body), tenant)
        if not rest and method == "GET":
            with self._lock:
                mine = [s.rendered() for s in self._subscriptions.values() if s.tenant == tenant]
            return 200, {"value": mine}
        if len(rest) != 1 or method not in ("PATCH", "DELETE", "GET"):
            raise SubscriptionError(405, "Request_BadRequest", f"{method} is not supported here.")
        with self._lock:
            sub = self._subscriptions.get(rest[0])
            if sub is None or sub.tenant != tenant:
                raise SubscriptionError(404, "ResourceNotFound", f"The object was not found: {rest[0]}")
            if method == "DELETE":
                del self._subscriptions[sub.id]
                return 204, None
            if method == "PATCH":
                sub.expires = self._expiry(_json_body(body))
            return 200, sub.rendered()

    def _create(self, body: dict[str, Any], tenant: str) -> dict[str, Any]:
        resource = str(body.get("resource", "")).strip("/")
        if resource not in RESOURCES:
            raise SubscriptionError(400, "InvalidRequest", f"Subscriptions to '{resource}' are not supported here.")
        change_types = frozenset(str(body.get("changeType", "")).split(","))
        if not change_types <= CHANGE_TYPES:
            raise SubscriptionError(400, "InvalidRequest", f"{resource} supports only changeType updated, deleted.")
        client_state = body.get("clientState")
        if client_state is not None and (not isinstance(client_state, str) or len(client_state) > 128):
            raise SubscriptionError(400, "InvalidRequest", "clientState is at most 128 characters.")
        expires = self._expiry(body)
        urls = [u for u in (body.get("notificationUrl"), body.get("lifecycleNotificationUrl")) if u is not None]
        if not urls or not all(isinstance(url, str) for url in urls):
            raise SubscriptionError(400, "InvalidRequest", "notificationUrl is required.")
        for url in dict.fromkeys(urls):
            self._validate(url)
        with self._lock:
            coll = self._graph._collections.get((tenant, resource))
            sub = _Subscription(
                str(uuid.uuid4()),
                tenant,
                resource,
                change_types,
                urls[0],
                urls[1] if len(urls) > 1 else None,
                client_state,
                expires,
                len(coll.log) if coll else 0,
            )
            self._subscriptions[sub.id] = sub
            self._start()
        return {"@odata.context": f"{self._graph.base_url}/v1.0/$metadata#subscriptions/$entity", **sub.rendered()}

    def _expiry(self, body: dict[str, Any]) -> float:
        text = body.get("expirationDateTime")
        try:
            expires = graph_ticks(text) / TICKS_PER_SECOND if isinstance(text, str) else None
        except ValueError:
            expires = None
        if expires is None:
            raise SubscriptionError(400, "InvalidRequest", "expirationDateTime is required, an ISO-8601 time.")
        if expires > self.clock() + self.max_lifetime_seconds:
            minutes = self.max_lifetime_seconds // 60
            raise SubscriptionError(
                400, "InvalidRequest", f"Subscription expiration can only be {minutes} minutes in the future."
            )
        if expires <= self.clock():
            raise SubscriptionError(400, "InvalidRequest", "expirationDateTime is in the past.")
        return expires

    def _validate(self, url: str) -> None:
        """Graph's validation handshake, as its docs describe; a wrong answer fails the creation."""
        token = f"Validation: Testing client application reachability for subscription Request-Id: {uuid.uuid4()}"
        request = urllib.request.Request(
            f"{url}?validationToken={quote(token)}", data=b"", method="POST", headers={"Content-Type": "text/plain"}
        )
        self.validations += 1
        try:
            with _OPENER.open(request, timeout=VALIDATION_TIMEOUT) as response:
                ok = (
                    response.status == 200
                    and response.headers.get_content_type() == "text/plain"
                    and response.read().decode() == token
                )
        except (OSError, urllib.error.HTTPError):
            ok = False
        if not ok:
            raise SubscriptionError(
                400,
                "InvalidRequest",
                "Subscription validation request failed. Notification endpoint must respond with 200 OK to "
                "validation request.",
            )

    # -- delivery (background threads) ---------------------------------------------------

    def _start(self) -> None:
        """Start watching and sending on the first subscription. Under the lock."""
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._watch, name="fake-graph notifications", daemon=True),
                threading.Thread(target=self._send, name="fake-graph deliveries", daemon=True),
            ]
            for thread in self._threads:
                thread.start()

    def _expire(self) -> None:
        """Forget subscriptions past their expiry, as Graph deletes them. Under the lock."""
        now = self.clock()
        for sub in [s for s in self._subscriptions.values() if s.expires <= now]:
            del self._subscriptions[sub.id]
            self.lapsed.append(sub.id)

    def _watch(self) -> None:
        while not self._closed.wait(WATCH_SECONDS):
            with self._graph._lock, self._lock:
                self._expire()
                for sub in self._subscriptions.values():
                    coll = self._graph._collections.get((sub.tenant, sub.resource))
                    if coll is None or len(coll.log) <= sub.seen:
                        continue
                    items = [self._item(sub, kind, oid) for kind, oid, _ in coll.log[sub.seen :]]
                    sub.seen = len(coll.log)
                    items = [item for item in items if item["changeType"] in sub.change_types]
                    for start in range(0, len(items), self.batch):
                        self._queue(sub.notification_url, items[start : start + self.batch])
                        if self.duplicate:
                            self._queue(sub.notification_url, items[start : start + self.batch])

    def _item(self, sub: _Subscription, kind: str, oid: str) -> dict[str, Any]:
        path = f"{sub.resource.capitalize()}/{oid}"
        return {
            "subscriptionId": sub.id,
            "subscriptionExpirationDateTime": graph_time(int(sub.expires * TICKS_PER_SECOND)),
            "tenantId": sub.tenant,
            "clientState": sub.client_state,
            "changeType": "deleted" if kind == "removed" else "updated",
            "resource": path,
            "resourceData": {"@odata.type": RESOURCES[sub.resource], "@odata.id": path, "id": oid},
        }

    def _queue(self, url: str, items: list[dict[str, Any]]) -> None:
        """Deliver ``items`` after :attr:`delay_seconds`. Under the lock."""
        now = time.time()
        heapq.heappush(self._outbox, _Outgoing(now + self.delay_seconds, next(self._seq), url, items, now))
        self._lock.notify_all()

    def _send(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                while not self._closed.is_set() and (not self._outbox or self._outbox[0].due > time.time()):
                    self._lock.wait(self._outbox[0].due - time.time() if self._outbox else 0.5)
                if self._closed.is_set():
                    return
                outgoing = heapq.heappop(self._outbox)
            status = _post(outgoing.url, {"value": outgoing.items})
            with self._lock:
                self.deliveries.append(Delivery(time.time(), outgoing.url, len(outgoing.items), status))
                if status is not None and 200 <= status < 300:
                    continue
                if time.time() - outgoing.first < self.retry_for_seconds:
                    outgoing.tries += 1
                    outgoing.due = time.time() + min(0.25 * 2**outgoing.tries, 4.0)
                    heapq.heappush(self._outbox, outgoing)
                else:
                    logger.info("fake Graph: dropping %d notifications for %s", len(outgoing.items), outgoing.url)


def _post(url: str, body: dict[str, Any]) -> int | None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with _OPENER.open(request, timeout=DELIVERY_TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SubscriptionError(400, "BadRequest", "Unable to read JSON request payload.") from None
    if not isinstance(document, dict):
        raise SubscriptionError(400, "BadRequest", "The request body must be a JSON object.")
    return document
