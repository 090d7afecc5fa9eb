"""Subscriptions kept alive against the fake Graph and Azurite, and what notifications make the daemon do.

In process: the real service (endpoint, records in Azurite, manager calling the fake Graph over HTTPS), with the
daemon's ``hurry`` recorded. The fleet, as processes, is in test_notify_fleet.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import REGISTRY

from graphsync.config import JobSettings, Settings, load_settings
from graphsync.graph import GraphClient
from graphsync.metrics import SUBSCRIPTION_EXPIRY
from graphsync.notify import NotificationService
from graphsync.notify.records import record_blob
from graphsync.schedule import slot_start
from graphsync.storage import BlobContent, BlobStore
from graphsync.timestamps import epoch
from graphsync.tokencache import TokenCaches
from tests.fakes.azurite import free_port

if TYPE_CHECKING:
    from tests.conftest import WriteConfig
    from tests.fakes.graph import FakeGraph

TENANT = "contoso.onmicrosoft.com"
JOBS = [
    {"name": "users", "resource": "users", "delta": True, "select": ["id", "displayName"], "every": "15m"},
    {"name": "groups", "resource": "groups", "delta": True, "select": ["id", "displayName"], "every": "15m"},
    {"name": "all-users", "resource": "users", "every": "1d"},  # a full listing: nothing to subscribe to
]


@dataclass
class Hurries:
    """What the service asked the daemon to run: (job, tenant, after, not_before)."""

    calls: list[tuple[str, str, float, float]] = field(default_factory=list)
    notified: list[float | None] = field(default_factory=list)  # when the notification asking for each came
    changed: threading.Event = field(default_factory=threading.Event)

    def __call__(
        self, job: JobSettings, tenant: str, *, after: float, not_before: float, notified: float | None = None
    ) -> None:
        self.calls.append((job.name, tenant, after, not_before))
        self.notified.append(notified)
        self.changed.set()

    def wait_for(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count and time.monotonic() < deadline:
            self.changed.wait(0.05)
            self.changed.clear()
        assert len(self.calls) >= count, f"expected {count} hurries, got {self.calls}"


@dataclass
class Fixture:
    settings: Settings
    service: NotificationService
    hurries: Hurries
    store: BlobStore
    graph: FakeGraph


Build = Callable[..., Fixture]


@pytest.fixture
def notify(graphsync_config: WriteConfig, fake_graph: FakeGraph, tmp_path: Path) -> Iterator[Build]:
    started: list[NotificationService] = []

    def build(
        jobs: list[dict[str, Any]] = JOBS,
        extra: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        port: int | None = None,
        storage: dict[str, Any] | None = None,
        run: bool = False,
    ) -> Fixture:
        port = port or free_port()
        section = {"notification_url": f"http://127.0.0.1:{port}/graph/notifications", "port": port}
        config = graphsync_config(
            f"config-{len(started)}.toml",
            extra={
                "graph": {"endpoint": fake_graph.base_url},
                "output": {"directory": str(tmp_path / "out")},
                "notifications": section | (extra or {}),
                "jobs": jobs,
                "storage": storage or {},
            },
        )
        settings = load_settings(config, {})
        store = BlobStore.from_settings(settings.storage)
        graph = GraphClient(fake_graph.base_url, "v1.0", TokenCaches.from_settings(settings, store))
        hurries = Hurries()
        service = NotificationService(settings, hurries, graph, store, replica=f"test-{len(started)}", clock=clock)
        if run:  # the endpoint, the maintenance of each slot and the worker for lifecycle notifications
            service.start()
        else:
            service.endpoint.start()
        started.append(service)
        return Fixture(settings, service, hurries, store, fake_graph)

    yield build
    for service in started:
        service.stop()


def test_each_delta_job_gets_one_validated_subscription_and_its_changes_hurry_it(notify: Build) -> None:
    f = notify()

    assert f.service.manager.maintain(TENANT, slot=0.0) == "done"

    subscriptions = {s["resource"]: s for s in f.graph.subscriptions.active()}
    assert sorted(subscriptions) == ["groups", "users"]
    assert f.graph.subscriptions.validations == 4, "both URLs of both subscriptions were validated"
    assert subscriptions["users"]["changeType"] == "deleted,updated"
    assert subscriptions["users"]["lifecycleNotificationUrl"].endswith("/graph/notifications/lifecycle")

    before = time.time()
    f.graph.add(TENANT, "users", {"id": "u1", "displayName": "Ada"})
    f.hurries.wait_for(1)

    [(job, tenant, after, not_before)] = f.hurries.calls
    assert (job, tenant) == ("users", TENANT)
    assert before <= after <= time.time()
    assert not_before == pytest.approx(after + f.settings.notifications.debounce_seconds)  # type: ignore[union-attr]


def test_a_second_check_in_the_same_slot_reads_one_blob_and_changes_nothing(notify: Build) -> None:
    a, b = notify(), notify()
    slot = slot_start(JobSettings(name="x", resource="users", every="5m"), time.time())
    assert a.service.manager.maintain(TENANT, slot) == "done"
    ids = {s["id"] for s in a.graph.subscriptions.active()}
    requests = len(a.graph.requests)

    assert b.service.manager.maintain(TENANT, slot) == "served"

    assert {s["id"] for s in a.graph.subscriptions.active()} == ids
    assert len(a.graph.requests) == requests, "no Graph call"
    assert b.service.directory.entry(TENANT, "users") is not None, "b learned the subscriptions from the record"


def test_renewal_across_a_simulated_month_never_lets_a_subscription_lapse(notify: Build) -> None:
    """Graph's clock and the service's run two months on, in 12-hour checks: every subscription is renewed
    before it expires (29 days, renewed 3 days ahead), never re-created, and Graph never drops one."""
    now = [time.time()]
    f = notify(clock=lambda: now[0])
    f.graph.subscriptions.clock = lambda: now[0]
    schedule = JobSettings(name="x", resource="users", every="12h")

    f.service.manager.maintain(TENANT, slot_start(schedule, now[0]))
    ids = {s["id"] for s in f.graph.subscriptions.active()}
    for _ in range(2 * 31 * 2):
        now[0] += 12 * 3600
        f.service.manager.maintain(TENANT, slot_start(schedule, now[0]))
        assert {s["id"] for s in f.graph.subscriptions.active()} == ids

    assert f.graph.subscriptions.lapsed == []
    renewals = [r for r in f.graph.requests if r.method == "PATCH"]
    assert 4 <= len(renewals) <= 6, "renewed about every 26 days, twice per subscription in two months"


def test_a_subscription_graph_dropped_is_created_again_and_a_catch_up_round_runs(notify: Build) -> None:
    now = [time.time()]
    f = notify(clock=lambda: now[0])
    f.service.manager.maintain(TENANT, 0.0)
    [users] = [s for s in f.graph.subscriptions.active() if s["resource"] == "users"]
    f.graph.subscriptions.clock = lambda: now[0] + 30 * 86400  # Graph let it expire: renewal finds it gone (404)
    f.graph.subscriptions.active()
    f.graph.subscriptions.clock = lambda: now[0]

    now[0] += 27 * 86400  # within renew_before of the expiry
    assert f.service.manager.maintain(TENANT, now[0]) == "done"

    [again] = [s for s in f.graph.subscriptions.active() if s["resource"] == "users"]
    assert again["id"] != users["id"]
    assert ("users", TENANT) in [(job, tenant) for job, tenant, *_ in f.hurries.calls]


def test_lifecycle_notifications_renew_recreate_or_catch_up(notify: Build) -> None:
    f = notify(run=True)
    deadline = time.monotonic() + 10
    while len(f.graph.subscriptions.active()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    by_resource = {s["resource"]: s for s in f.graph.subscriptions.active()}

    f.graph.subscriptions.send_lifecycle(by_resource["groups"]["id"], "missed")
    f.hurries.wait_for(1)
    job, tenant, after, not_before = f.hurries.calls[0]
    assert (job, tenant, not_before) == ("groups", TENANT, after), "a catch-up round now, no debounce"

    f.graph.subscriptions.send_lifecycle(by_resource["users"]["id"], "subscriptionRemoved")
    f.hurries.wait_for(2)
    assert f.hurries.calls[1][:2] == ("users", TENANT), "re-created, then a catch-up round"
    users = [s for s in f.graph.subscriptions.active() if s["resource"] == "users"]
    assert len(users) == 1 and users[0]["id"] != by_resource["users"]["id"]

    patches = len([r for r in f.graph.requests if r.method == "PATCH"])
    f.graph.subscriptions.send_lifecycle(users[0]["id"], "reauthorizationRequired")
    deadline = time.monotonic() + 10
    while len([r for r in f.graph.requests if r.method == "PATCH"]) == patches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len([r for r in f.graph.requests if r.method == "PATCH"]) == patches + 1, "renewed (reauthorized)"


def test_a_job_that_leaves_the_configuration_loses_its_subscription(notify: Build) -> None:
    port = free_port()
    before = notify(port=port)
    before.service.manager.maintain(TENANT, 0.0)
    before.service.stop()

    after = notify(jobs=JOBS[:1], port=port)
    after.service.manager.maintain(TENANT, None, {"users": "renew"})

    assert [s["resource"] for s in after.graph.subscriptions.active()] == ["users"]
    assert after.service.directory.entry(TENANT, "groups") is None


def test_client_states_are_sealed_in_storage_when_a_key_is_configured(notify: Build, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n")  # base64 of 32 bytes
    f = notify(storage={"encryption_key_file": str(key)})
    f.service.manager.maintain(TENANT, 0.0)

    content = f.store.read(record_blob(TENANT))
    assert isinstance(content, BlobContent)
    states = [s["clientState"] for s in f.graph.subscriptions.active()]
    assert not any(state in content.data.decode() for state in states)
    assert all("ciphertext" in sub["client_state"] for sub in json.loads(content.data)["subscriptions"].values())
    other = notify(storage={"encryption_key_file": str(key)})
    assert other.service.manager.maintain(TENANT, 0.0) == "served", "another replica reads the sealed record"
    entry = other.service.directory.entry(TENANT, "users")
    assert entry is not None and entry.client_state in states


def _sample(name: str, job: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"tenant": TENANT, "job": job})


def test_every_replica_exports_the_records_expiry_and_failures_also_one_that_found_the_slot_served(
    notify: Build,
) -> None:
    """The alerts read these gauges: they must hold when the replica that maintained the record is gone."""
    unreachable = notify(extra={"notification_url": f"http://127.0.0.1:{free_port()}/graph/notifications"})
    assert unreachable.service.manager.maintain(TENANT, 0.0) == "incomplete", "the handshake reached nothing"
    assert _sample("graphsync_subscription_failing", "users") == 1
    assert _sample("graphsync_subscription_expiration_timestamp_seconds", "users") is None

    a, b = notify(), notify()
    slot = time.time()
    assert a.service.manager.maintain(TENANT, slot) == "done"
    expiry = {s["resource"]: s["expirationDateTime"] for s in a.graph.subscriptions.active()}
    SUBSCRIPTION_EXPIRY.labels(TENANT, "users").set(0)  # as if only the maintaining replica had set it

    assert b.service.manager.maintain(TENANT, slot) == "served"
    assert _sample("graphsync_subscription_failing", "users") == 0
    exported = _sample("graphsync_subscription_expiration_timestamp_seconds", "users")
    assert exported == pytest.approx(epoch(expiry["users"]), abs=0.01)
