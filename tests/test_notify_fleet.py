"""Change notifications through a fleet: `graphsync run` processes behind a round-robin proxy.

The fake Graph posts each directory change to the proxy, which hands it to any replica; the round runs on whichever
replica gets there, once fleet-wide. With ``every = "15m"`` (or ``"1d"``) no slot comes during a test (the first run
after start aside), so every export seen after the first run was started by a notification or a catch-up round.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from graphsync.config import load_settings
from graphsync.notify.records import SubscriptionRecords, TenantRecord
from graphsync.storage import BlobStore
from graphsync.timestamps import epoch
from tests import test_daemon
from tests.fakes.azurite import free_port
from tests.fakes.proxy import RoundRobinProxy

if TYPE_CHECKING:
    from tests.conftest import WriteConfig
    from tests.fakes.graph import FakeGraph
    from tests.test_daemon import Replica

TENANT = "contoso.onmicrosoft.com"
USERS = 50
NOTIFICATIONS_PATH = "/graph/notifications"
replicas = test_daemon.replicas  # the fixture that starts `graphsync run` processes


@dataclass
class Fleet:
    """Replicas of one configuration behind ``proxy`` (the public notification URL), exporting to ``output``."""

    replicas: list[Replica]
    proxy: RoundRobinProxy
    output: Path
    records: SubscriptionRecords

    def names(self) -> dict[str, Any]:
        """The users snapshot as {id: displayName}; empty before the first publication."""
        path = self.output / TENANT / "users" / "snapshot.jsonl"
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        return {record["id"]: record.get("displayName") for record in map(json.loads, lines)}

    def record(self) -> TenantRecord:
        return self.records.read(TENANT)


StartFleet = Callable[..., Fleet]


@pytest.fixture
def notify_fleet(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, replicas: Any, tmp_path: Path
) -> Iterator[StartFleet]:
    """Starts ``count`` replicas with one delta users job (``every``) and ``[notifications]`` (plus ``settings``)
    behind a round-robin proxy, once the fake Graph holds :data:`USERS` users; returns when the first round is
    published and the fleet's subscription exists."""
    proxies: list[RoundRobinProxy] = []

    def start(count: int = 3, every: str = "15m", settings: dict[str, Any] | None = None) -> Fleet:
        fake_graph.add_many(TENANT, "users", [{"id": f"user-{n:03d}", "displayName": "start"} for n in range(USERS)])
        ports, public = [free_port() for _ in range(count)], free_port()
        config = graphsync_config(
            extra={
                "graph": {"endpoint": fake_graph.base_url},
                "output": {"directory": str(tmp_path / "out")},
                "notifications": {
                    "notification_url": f"http://127.0.0.1:{public}{NOTIFICATIONS_PATH}",
                    "host": "127.0.0.1",
                }
                | (settings or {}),
                "jobs": [
                    {
                        "name": "users",
                        "resource": "users",
                        "delta": True,
                        "select": ["id", "displayName"],
                        "every": every,
                    }
                ],
            }
        )
        proxy = RoundRobinProxy([("127.0.0.1", port) for port in ports], public).start()
        proxies.append(proxy)
        fleet = [replicas(config, env={"GRAPHSYNC_NOTIFICATIONS__PORT": str(port)}) for port in ports]
        store = BlobStore.from_settings(load_settings(config, {}).storage)
        started = Fleet(fleet, proxy, tmp_path / "out", SubscriptionRecords(store, []))
        _wait(lambda: len(started.names()) == USERS, 90, "the first run's snapshot")  # three replicas start, loaded
        _wait(lambda: len(fake_graph.subscriptions.active()) == 1, 60, "the fleet's one subscription")
        return started

    yield start
    for proxy in proxies:
        proxy.stop()


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _rounds_started(fleet: list[Replica], since: float) -> int:
    return sum(
        1
        for replica in fleet
        for record in replica.records()
        if record.get("job") == "users"
        and record["message"].endswith("started")
        and record["message"].startswith("run ")
        and epoch(record["time"]) >= since
    )


def _truth(graph: FakeGraph) -> dict[str, Any]:
    return {uid: obj.get("displayName") for uid, obj in graph.objects(TENANT, "users").items()}


@pytest.mark.slow
def test_three_replicas_export_a_change_within_seconds_and_a_burst_costs_at_most_two_rounds(
    notify_fleet: StartFleet, fake_graph: FakeGraph
) -> None:
    f = notify_fleet(3)
    ids = sorted(f.names())
    time.sleep(6)  # every replica's first run (within 5 s of its start) has been and gone

    latencies = []
    for n, uid in enumerate(ids[:20]):
        changed = time.monotonic()
        fake_graph.update(TENANT, "users", uid, displayName=f"changed-{n}")
        _wait(lambda uid=uid, n=n: f.names().get(uid) == f"changed-{n}", 30, f"change {n} exported")
        latencies.append(time.monotonic() - changed)
    p95 = statistics.quantiles(latencies, n=20)[-1]
    assert p95 <= 5.0, f"p95 change-to-snapshot {p95:.1f} s; all: {[round(x, 1) for x in latencies]}"

    time.sleep(2)
    burst = time.time()
    for n, uid in enumerate(ids * 2):  # 100 changes within one second
        fake_graph.update(TENANT, "users", uid, displayName=f"burst-{n}")
        time.sleep(0.009)
    spread = time.time() - burst
    _wait(lambda: all(f.names()[uid].startswith("burst-") for uid in ids), 30, "the burst exported")
    time.sleep(4)  # any round still owed would have started by now
    assert f.names() == _truth(fake_graph)
    rounds = _rounds_started(f.replicas, burst)
    assert 1 <= rounds <= 2, f"{rounds} rounds for one burst of {spread:.1f} s"
    delivered = {d.url for d in fake_graph.subscriptions.deliveries}
    assert delivered == {f"http://127.0.0.1:{f.proxy.address[1]}{NOTIFICATIONS_PATH}"}
    served = {replica.log.name for replica in f.replicas if _rounds_started([replica], 0) > 0}
    assert len(served) >= 2, "notifications reach every replica; rounds ran on more than one"


@pytest.mark.slow
def test_when_the_replica_keeping_the_subscriptions_is_killed_another_renews_them_before_they_expire(
    notify_fleet: StartFleet, fake_graph: FakeGraph
) -> None:
    """Subscriptions live 30 s and are renewed 12 s ahead, checked every 5 s: the SIGKILLed keeper's last
    renewal runs out within 30 s, so only a takeover keeps the subscription alive."""
    f = notify_fleet(3, settings={"lifetime": "30s", "renew_before": "12s", "check_every": "5s"})
    [subscription] = fake_graph.subscriptions.active()
    _wait(lambda: f.record().maintained_by is not None, 10, "a replica to record its maintenance")
    record = f.record()
    [keeper] = [r for r in f.replicas if record.maintained_by == f"{_host(record)}-{r.process.pid}"]

    keeper.process.send_signal(signal.SIGKILL)
    killed = time.time()
    expiry_then = record.subscriptions["users"].expires

    _wait(
        lambda: (
            (now := f.record()).maintained_by != record.maintained_by
            and now.maintained_at is not None
            and now.maintained_at > killed
            and now.subscriptions["users"].expires > expiry_then
        ),
        30,
        "another replica to take over and renew",
    )
    time.sleep(max(0.0, expiry_then - time.time()) + 1)  # the killed keeper's last renewal has run out

    assert fake_graph.subscriptions.lapsed == [], "no subscription expired"
    assert [s["id"] for s in fake_graph.subscriptions.active()] == [subscription["id"]], "renewed, never re-created"
    fake_graph.update(TENANT, "users", "user-007", displayName="after the takeover")
    _wait(lambda: f.names().get("user-007") == "after the takeover", 15, "a change notified and exported")


@pytest.mark.slow
def test_missed_and_subscription_removed_run_a_catch_up_round_that_exports_every_unannounced_change(
    notify_fleet: StartFleet, fake_graph: FakeGraph
) -> None:
    """With ``every = "1d"`` only notifications and catch-up rounds export anything during the test."""
    f = notify_fleet(2, every="1d")
    [subscription] = fake_graph.subscriptions.active()

    # missed: changes whose notifications Graph could not deliver (the endpoint down) and dropped.
    fake_graph.subscriptions.retry_for_seconds = 0.5
    f.proxy.stop()
    fake_graph.update(TENANT, "users", "user-001", displayName="missed")
    fake_graph.delete(TENANT, "users", "user-002")
    fake_graph.add(TENANT, "users", {"id": "user-100", "displayName": "missed"})
    _wait(lambda: len(fake_graph.subscriptions.deliveries) >= 2, 10, "Graph to give up delivering")
    time.sleep(1)
    assert f.names().get("user-001") == "start", "nothing announced, nothing exported yet"
    f.proxy.start()
    announced = time.time()
    fake_graph.subscriptions.send_lifecycle(subscription["id"], "missed")
    _wait(lambda: f.names() == _truth(fake_graph), 15, "the catch-up round after missed")
    assert _rounds_started(f.replicas, announced) >= 1

    # subscriptionRemoved: Graph deleted the subscription; changes after that were never announced.
    fake_graph.subscriptions.retry_for_seconds = 30
    f.proxy.stop()
    fake_graph.subscriptions.send_lifecycle(subscription["id"], "subscriptionRemoved")
    fake_graph.update(TENANT, "users", "user-003", displayName="removed")
    fake_graph.delete(TENANT, "users", "user-004")
    time.sleep(1)
    assert f.names().get("user-003") == "start", "nothing announced, nothing exported yet"
    back = time.time()
    f.proxy.start()
    _wait(lambda: f.names() == _truth(fake_graph), 20, "the catch-up round after subscriptionRemoved")
    assert _rounds_started(f.replicas, back) >= 1
    [again] = fake_graph.subscriptions.active()
    assert again["id"] != subscription["id"], "created anew"
    fake_graph.update(TENANT, "users", "user-005", displayName="announced again")
    _wait(lambda: f.names().get("user-005") == "announced again", 15, "a change through the new subscription")


@pytest.mark.slow
def test_with_the_endpoint_down_the_schedule_exports_every_change_and_notifications_resume_when_it_is_back(
    notify_fleet: StartFleet, fake_graph: FakeGraph
) -> None:
    f = notify_fleet(2, every="10s")
    fake_graph.subscriptions.retry_for_seconds = 1.0
    f.proxy.stop()
    down = len(fake_graph.subscriptions.deliveries)
    for n in range(6):
        fake_graph.update(TENANT, "users", f"user-{n:03d}", displayName=f"while down {n}")
        fake_graph.add(TENANT, "users", {"id": f"new-{n}", "displayName": "added while down"})
        time.sleep(0.5)
    fake_graph.delete(TENANT, "users", "user-049")

    _wait(lambda: f.names() == _truth(fake_graph), 30, "the schedule to export every change")
    assert all(d.status is None for d in fake_graph.subscriptions.deliveries[down:]), "no notification got through"

    f.proxy.start()
    back = len(fake_graph.subscriptions.deliveries)
    fake_graph.update(TENANT, "users", "user-010", displayName="endpoint back")
    _wait(lambda: f.names().get("user-010") == "endpoint back", 15, "the change exported")
    _wait(
        lambda: any(d.status == 202 for d in fake_graph.subscriptions.deliveries[back:]),
        10,
        "a notification accepted again",
    )


def _host(record: TenantRecord) -> str:
    """The host part of the replica name in ``record`` (``<host>-<pid>``)."""
    assert record.maintained_by is not None
    return record.maintained_by.rsplit("-", 1)[0]
