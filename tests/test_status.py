"""`graphsync status`: the token cache and every job's state as an operator needs them, never a secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphsync.config import load_settings
from graphsync.notify.records import SubscriptionRecords
from graphsync.storage import BlobStore
from graphsync.timestamps import epoch
from tests import test_daemon
from tests.conftest import REPO_ROOT
from tests.fakes.azurite import free_port
from tests.fakes.entra import CLIENT_SECRET, FakeEntra
from tests.fakes.graph import FakeGraph, populate
from tests.fakes.proxy import RoundRobinProxy

if TYPE_CHECKING:
    from tests.conftest import RunGraphsync, WriteConfig

TENANT = "contoso.onmicrosoft.com"
replicas = test_daemon.replicas  # the fixture that starts `graphsync run` processes


def _status(run_graphsync: RunGraphsync, config: Path) -> dict:
    result = run_graphsync("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert CLIENT_SECRET not in result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_status_reports_cache_jobs_lock_holder_and_stale_delta_tokens(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    fake_graph: FakeGraph,
    fake_entra: FakeEntra,
    tls_env: dict[str, str],
    tmp_path: Path,
) -> None:
    populate(fake_graph, TENANT, users=400, groups=0)
    output = tmp_path / "out"
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(output)},
            "jobs": [{"name": "users", "resource": "users", "delta": True, "every": "15m"}],
        }
    )

    before = _status(run_graphsync, config)
    assert before["tenants"][0]["problem"].startswith("no cache blob yet")
    assert before["jobs"][0]["last_success"] is None

    assert run_graphsync("sync", "--config", str(config)).returncode == 0
    asked = datetime.now(UTC)  # next_due is after the moment status ran, which is after this
    report = _status(run_graphsync, config)
    [tenant] = report["tenants"]
    issued = [r for r in fake_entra.token_requests() if r.access_token]
    assert tenant["tokens"] == 1 and tenant["problem"] is None
    # MSAL dates the expiry from when it read the answer: after the fake's clock read, by however long a loaded
    # machine takes to get there; a minute tells the token's own expiry from anything else.
    assert 0 <= tenant["token_expires_on"] - int(issued[0].time + 3600) < 60
    assert issued[0].access_token not in json.dumps(report)
    [job] = report["jobs"]
    assert job["objects"] == 400 and job["last_error"] is None and job["lock_holder"] is None
    assert job["warnings"] == []
    # The snapshot's size and chunks, and whether this host's working store matches it; another host's does not.
    assert job["snapshot_bytes"] == (output / TENANT / "users" / "snapshot.jsonl").stat().st_size
    assert 400 / 256 <= job["snapshot_chunks"] <= 400 / 16
    assert job["warm_store_here"] is True
    elsewhere = run_graphsync(
        "status", "--json", "--config", str(config), env={"XDG_CACHE_HOME": str(tmp_path / "other-host")}
    )
    assert json.loads(elsewhere.stdout.strip().splitlines()[-1])["jobs"][0]["warm_store_here"] is False
    next_due = datetime.fromisoformat(job["next_due"])
    assert next_due.minute % 15 == 0 and next_due.second == 0 and next_due > asked

    fake_graph.page_size = 20
    fake_graph.slow_pages = 0.3
    fake_graph.expire_delta_tokens()
    sync = subprocess.Popen(
        [sys.executable, "-m", "graphsync", "sync", "--config", str(config)],
        cwd=REPO_ROOT,
        env=os.environ | tls_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        holder = None
        # The lock blob names its holder in metadata written just after the lease is taken: for a moment the new
        # lease shows the previous holder's name (the first sync's), so wait for this sync's.
        while not (holder or "").endswith(f"-{sync.pid}") and time.monotonic() < deadline:
            holder = _status(run_graphsync, config)["jobs"][0]["lock_holder"]
        assert holder is not None and holder.endswith(f"-{sync.pid}"), holder
    finally:
        sync.wait(timeout=60)

    state_file = output / TENANT / "users" / "state.json"
    state = json.loads(state_file.read_text())
    state["last_success"] = (datetime.now(UTC) - timedelta(days=6, hours=1)).isoformat().replace("+00:00", "Z")
    state_file.write_text(json.dumps(state))
    [job] = _status(run_graphsync, config)["jobs"]
    assert any("delta token expires after 7 days" in warning for warning in job["warnings"])


def test_status_shows_each_subscription_its_expiry_last_notification_and_error_never_its_client_state(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    fake_graph: FakeGraph,
    replicas: Any,
    tmp_path: Path,
) -> None:
    """A daemon whose public notification URL first reaches nothing (the ingress not routed yet), then its
    endpoint: status shows the failed creation, then the subscription and the notification a change brought."""
    populate(fake_graph, TENANT, users=20, groups=0)
    output, public, port = tmp_path / "out", free_port(), free_port()
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(output)},
            "notifications": {
                "notification_url": f"http://127.0.0.1:{public}/graph/notifications",
                "host": "127.0.0.1",
                "port": port,
                "check_every": "10s",  # a failed creation is tried again within 3 s
            },
            "jobs": [{"name": "users", "resource": "users", "delta": True, "every": "1d"}],
        }
    )
    records = SubscriptionRecords(BlobStore.from_settings(load_settings(config, {}).storage), [])
    replica = replicas(config)
    _wait_for(lambda: records.read(TENANT).errors, 20, "the failed creation to be recorded")

    [line] = _status(run_graphsync, config)["subscriptions"]
    assert (line["tenant"], line["job"], line["resource"]) == (TENANT, "users", "users")
    assert line["expires"] is None and line["last_notification"] is None
    assert "validation" in line["error"]
    assert line["warnings"] == ["no subscription yet: changes reach the export on its schedule only"]

    with RoundRobinProxy([("127.0.0.1", port)], public):
        _wait_for(lambda: fake_graph.subscriptions.active(), 20, "the subscription")
        _wait_for(lambda: (output / TENANT / "users" / "state.json").exists(), 20, "the first round")
        changed = time.time()
        fake_graph.update(TENANT, "users", next(iter(fake_graph.objects(TENANT, "users"))), displayName="notified")
        _wait_for(lambda: "notified" in (output / TENANT / "users" / "snapshot.jsonl").read_text(), 20, "the export")
        [subscription] = fake_graph.subscriptions.active()
        result = run_graphsync("status", "--json", "--config", str(config))
        text = run_graphsync("status", "--config", str(config))

    assert subscription["clientState"] not in result.stdout + result.stderr + text.stdout + text.stderr
    [line] = json.loads(result.stdout.strip().splitlines()[-1])["subscriptions"]
    assert line["subscription_id"] == subscription["id"] and line["error"] is None and line["warnings"] == []
    assert abs(epoch(line["expires"]) - (changed + 29 * 86400)) < 60
    assert changed - 0.01 <= epoch(line["last_notification"]) <= time.time()
    assert line["maintained_by"].endswith(f"-{replica.process.pid}")
    assert "change notification subscriptions" in text.stdout and subscription["id"] not in text.stdout


def _wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_status_shows_each_tables_version_rows_per_tenant_and_last_commit(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph, tmp_path: Path
) -> None:
    from deltalake import DeltaTable

    tenants = (TENANT, "fabrikam.onmicrosoft.com")
    for number, tenant in enumerate(tenants):
        populate(fake_graph, tenant, users=30 + 10 * number, groups=0, seed=number)
    output = tmp_path / "out"
    config = graphsync_config(
        tenants=tenants,
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(output), "tables": True},
            "jobs": [{"name": "users", "resource": "users", "delta": True, "select": ["displayName"], "every": "1h"}],
        },
    )
    before = _status(run_graphsync, config)["tables"]
    assert before["root"] == str(output / "tables")
    assert [(t["table"], t["version"]) for t in before["tables"]] == [("users", None), ("users_history", None)]

    started = datetime.now(UTC)
    assert run_graphsync("sync", "--config", str(config)).returncode == 0
    report = _status(run_graphsync, config)["tables"]["tables"]
    for entry in report:
        table = DeltaTable(str(output / "tables" / entry["table"]))
        assert entry["version"] == table.version()
        assert entry["rows"] == {TENANT: 30, "fabrikam.onmicrosoft.com": 40}
        assert started - timedelta(seconds=5) <= datetime.fromisoformat(entry["last_commit"]) <= datetime.now(UTC)
    text = run_graphsync("status", "--config", str(config)).stdout
    assert "tables →" in text and "users_history" in text
