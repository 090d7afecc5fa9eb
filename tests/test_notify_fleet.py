"""Change notifications through a fleet: three `graphsync run` processes behind a round-robin proxy.

The fake Graph posts each directory change to the proxy, which hands it to any replica; the round runs on whichever
replica gets there, once fleet-wide. With ``every = "15m"`` no slot comes during the test (the first run after
start aside), so every export seen here was started by a notification.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

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
replicas = test_daemon.replicas  # the fixture that starts `graphsync run` processes


def _snapshot_names(output: Path) -> dict[str, Any]:
    path = output / TENANT / "users" / "snapshot.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return {record["id"]: record.get("displayName") for record in map(json.loads, lines)}


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


@pytest.mark.slow
def test_three_replicas_export_a_change_within_seconds_and_a_burst_costs_at_most_two_rounds(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, replicas: Any, tmp_path: Path
) -> None:
    ids = [f"user-{n:03d}" for n in range(USERS)]
    fake_graph.add_many(TENANT, "users", [{"id": uid, "displayName": "start"} for uid in ids])
    output = tmp_path / "out"
    ports = [free_port() for _ in range(3)]
    public = free_port()
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(output)},
            "notifications": {
                "notification_url": f"http://127.0.0.1:{public}/graph/notifications",
                "host": "127.0.0.1",
            },
            "jobs": [
                {"name": "users", "resource": "users", "delta": True, "select": ["id", "displayName"], "every": "15m"}
            ],
        }
    )
    with RoundRobinProxy([("127.0.0.1", port) for port in ports], public):
        fleet = [replicas(config, env={"GRAPHSYNC_NOTIFICATIONS__PORT": str(port)}) for port in ports]
        _wait(lambda: len(_snapshot_names(output)) == USERS, 30, "the first run's snapshot")
        _wait(lambda: len(fake_graph.subscriptions.active()) == 1, 30, "the fleet's one subscription")
        time.sleep(6)  # every replica's first run (within 5 s of its start) has been and gone

        latencies = []
        for n, uid in enumerate(ids[:20]):
            changed = time.monotonic()
            fake_graph.update(TENANT, "users", uid, displayName=f"changed-{n}")
            _wait(lambda uid=uid, n=n: _snapshot_names(output).get(uid) == f"changed-{n}", 30, f"change {n} exported")
            latencies.append(time.monotonic() - changed)
        p95 = statistics.quantiles(latencies, n=20)[-1]
        assert p95 <= 5.0, f"p95 change-to-snapshot {p95:.1f} s; all: {[round(x, 1) for x in latencies]}"

        time.sleep(2)
        burst = time.time()
        for n, uid in enumerate(ids * 2):  # 100 changes within one second
            fake_graph.update(TENANT, "users", uid, displayName=f"burst-{n}")
            time.sleep(0.009)
        _wait(lambda: all(_snapshot_names(output)[uid].startswith("burst-") for uid in ids), 30, "the burst exported")
        time.sleep(4)  # any round still owed would have started by now
        truth = {uid: obj["displayName"] for uid, obj in fake_graph.objects(TENANT, "users").items()}
        assert _snapshot_names(output) == truth
        rounds = _rounds_started(fleet, burst)
        assert 1 <= rounds <= 2, f"{rounds} rounds for one burst"
        delivered = {d.url for d in fake_graph.subscriptions.deliveries}
        assert delivered == {f"http://127.0.0.1:{public}/graph/notifications"}
        served = {replica.log.name for replica in fleet if _rounds_started([replica], 0) > 0}
        assert len(served) >= 2, "notifications reach every replica; rounds ran on more than one"
