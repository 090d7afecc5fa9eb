"""Three `graphsync run` replicas, 30 tenants, committing to the same tables in Azurite, slot after slot.

The oracle is what the replicas publish: after each slot, every tenant's JSONL snapshot. At the end the ``users``
table holds exactly each tenant's last snapshot, and ``users_history`` holds exactly one row per version each
object went through across the slots (one per run of consecutive snapshots with the same values): a commit lost to
a collision would leave a version out, one applied twice would leave it in twice. Slots are 15 s, so the test takes
about a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContainerClient
from deltalake import DeltaTable

from graphsync.schedule import interval_seconds
from graphsync.timestamps import epoch
from tests.conftest import REPO_ROOT
from tests.fakes.graph import FakeGraph, mutate, populate
from tests.test_tables import azurite_options

if TYPE_CHECKING:
    from tests.conftest import Azurite, WriteConfig

TENANTS = [f"tenant{index:02d}.onmicrosoft.com" for index in range(30)]
SELECT = ["displayName", "mail", "jobTitle"]
EVERY = "15s"
SLOTS_WITH_CHANGES = 2


def state(container: ContainerClient, tenant: str) -> dict[str, Any]:
    with contextlib.suppress(ResourceNotFoundError):
        return dict(json.loads(container.download_blob(f"{tenant}/users/state.json").readall()))
    return {}


def snapshot(container: ContainerClient, tenant: str) -> dict[str, tuple[Any, ...]]:
    lines = container.download_blob(f"{tenant}/users/snapshot.jsonl").readall().splitlines()
    return {obj["id"]: tuple(obj.get(name) for name in SELECT) for obj in map(json.loads, lines)}


def last_started(container: ContainerClient, tenant: str) -> float:
    started = state(container, tenant).get("last_success_started")
    return epoch(started) if started else -1.0


def wait_for_slot(container: ContainerClient, after: float, timeout: float = 60) -> None:
    """Until every tenant's last success started at or after ``after``: the slot is done, the fleet quiet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(last_started(container, tenant) >= after for tenant in TENANTS):
            return
        time.sleep(0.5)
    late = [tenant for tenant in TENANTS if last_started(container, tenant) < after]
    raise AssertionError(f"{len(late)} tenants did not run the slot after {after}: {late[:3]}")


def versions(history: list[dict[str, tuple[Any, ...]]]) -> Counter[tuple[str, tuple[Any, ...]]]:
    """Each object's versions across the snapshots: one per run of consecutive snapshots holding the same values."""
    counted: Counter[tuple[str, tuple[Any, ...]]] = Counter()
    for index, objects in enumerate(history):
        for oid, values in objects.items():
            if index == 0 or history[index - 1].get(oid) != values:
                counted[(oid, values)] += 1
    return counted


def test_three_replicas_and_thirty_tenants_commit_to_one_table_without_losing_or_doubling_a_change(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    azurite: Azurite,
    blob_container: str,
    tls_env: dict[str, str],
    tmp_path: Path,
) -> None:
    for number, tenant in enumerate(TENANTS):
        populate(fake_graph, tenant, users=12, groups=0, seed=number)
    exports = f"{blob_container}-out"
    config = graphsync_config(
        tenants=TENANTS,
        extra={
            "log_level": "INFO",
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"container": exports, "tables": True},
            "run": {"concurrency": 8, "per_tenant": 1},
            "jobs": [{"name": "users", "resource": "users", "delta": True, "select": SELECT, "every": EVERY}],
        },
    )
    period = interval_seconds(EVERY)
    replicas = []
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        container = service.create_container(exports)
        try:
            for name in ("a", "b", "c"):  # three hosts: their own working stores, one log file each
                log = (tmp_path / f"replica-{name}.log").open("w")
                env = {**os.environ, **tls_env, "XDG_CACHE_HOME": str(tmp_path / f"host-{name}")}
                command = [sys.executable, "-m", "graphsync", "run", "--config", str(config)]
                replicas.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
            wait_for_slot(container, 0)  # every tenant's first (full) round
            seen = [{t: snapshot(container, t) for t in TENANTS}]
            rng = random.Random(14)
            for _ in range(SLOTS_WITH_CHANGES):
                for tenant in TENANTS:  # now, while no round runs: the slot's rounds are done
                    mutate(fake_graph, tenant, rng, changes=3)
                wait_for_slot(container, (time.time() // period + 1) * period)
                seen.append({t: snapshot(container, t) for t in TENANTS})
        finally:
            for process in replicas:
                process.terminate()
            for process in replicas:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
        runners = {state(container, tenant).get("replica") for tenant in TENANTS}

    assert all(process.returncode == 0 for process in replicas), [p.returncode for p in replicas]
    options = azurite_options(azurite)
    users = DeltaTable(f"az://{exports}/tables/users", storage_options=options).to_pyarrow_table().to_pylist()
    history = DeltaTable(f"az://{exports}/tables/users_history", storage_options=options).to_pyarrow_table()
    for tenant in TENANTS:
        mine = {row["id"]: tuple(row[name] for name in SELECT) for row in users if row["tenant_id"] == tenant}
        assert mine == seen[-1][tenant], f"{tenant}: users differs from its last snapshot"
        rows = [row for row in history.to_pylist() if row["tenant_id"] == tenant]
        got = Counter((row["id"], tuple(row[name] for name in SELECT)) for row in rows)
        want = versions([slot[tenant] for slot in seen])
        assert got == want, f"{tenant}: history has {got - want} more and {want - got} fewer versions than the slots"
        assert sum(row["is_current"] for row in rows) == len(seen[-1][tenant])
    assert len(runners) >= 2, f"the tenants' last rounds ran on {runners}: the replicas shared the work"
