"""Sync runs that go wrong in the ways a fleet really does: a lost lock, a vanished snapshot, a refused token."""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from azure.storage.blob import BlobLeaseClient, BlobServiceClient

from graphsync.config import load_settings
from graphsync.graph import GraphClient
from graphsync.jobs import JobRunner, lock_blob
from graphsync.sinks import sink_from_settings
from graphsync.snapshot import SnapshotStore
from graphsync.storage import BlobStore
from graphsync.tokencache import TokenCaches
from graphsync.workstore import WorkStores
from tests.fakes.graph import FakeGraph, mutate, populate

if TYPE_CHECKING:
    from tests.conftest import Azurite, RunGraphsync, WriteConfig
    from tests.fakes.entra import FakeEntra

TENANT = "contoso.onmicrosoft.com"
SELECT = ["id", "displayName", "mail"]
TRUNCATED = b'{"value": [{"id": "x"'


def _config(graphsync_config: WriteConfig, graph: FakeGraph, output: Path, jobs: list[str] | None = None) -> Path:
    return graphsync_config(
        extra={
            "graph": {"endpoint": graph.base_url},
            "output": {"directory": str(output)},
            "jobs": [
                {
                    "name": name,
                    "resource": name,
                    "delta": True,
                    "select": SELECT if name == "users" else ["id"],
                    "every": "1h",
                }
                for name in jobs or ["users"]
            ],
        }
    )


def _snapshot(output: Path, job: str = "users") -> list[dict]:
    return [json.loads(line) for line in (output / TENANT / job / "snapshot.jsonl").read_text().splitlines()]


def _truth(graph: FakeGraph) -> list[dict]:
    return sorted(
        ({k: o.get(k) for k in SELECT} for o in graph.objects(TENANT, "users").values()), key=lambda o: o["id"]
    )


def test_a_replica_that_lost_its_lock_mid_run_publishes_nothing(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, azurite: Azurite, tmp_path: Path
) -> None:
    """A stalls past its lease; B takes the lock and completes; when A resumes, its snapshot must not land."""
    populate(fake_graph, TENANT, users=300, groups=0)
    fake_graph.page_size = 100
    output = tmp_path / "out"
    settings = load_settings(_config(graphsync_config, fake_graph, output))
    store = BlobStore.from_settings(settings.storage)
    graph = GraphClient(settings.graph.endpoint, "v1.0", TokenCaches.from_settings(settings, store))
    [job] = settings.jobs
    # Two replicas on two hosts: each has its own work directory.
    a = JobRunner(
        graph=graph,
        sink=sink_from_settings(settings),
        locks=store,
        stores=WorkStores(tmp_path / "a"),
        replica="replica-a",
    )
    b = JobRunner(
        graph=graph,
        sink=sink_from_settings(settings),
        locks=store,
        stores=WorkStores(tmp_path / "b"),
        replica="replica-b",
    )
    lock = BlobServiceClient.from_connection_string(azurite.connection_string).get_blob_client(
        settings.storage.container, lock_blob(TENANT, "users")
    )
    b_results = []

    def a_stalls(tenant: str, job_name: str, pages: int, records: int) -> None:
        if pages == 2 and not b_results:
            BlobLeaseClient(lock).break_lease(lease_break_period=0)  # A's lease is gone, A does not know yet
            mutate(fake_graph, TENANT, random.Random(1), changes=10)
            b_results.append(b.run(job, TENANT))

    result_a = a.run(job, TENANT, progress=a_stalls)
    [result_b] = b_results
    assert result_b.status == "ok"
    assert result_a.status == "failed" and "published nothing" in result_a.message
    assert _snapshot(output) == _truth(fake_graph), "the stale replica's snapshot replaced the newer one"
    state = json.loads((output / TENANT / "users" / "state.json").read_text())
    assert state["last_run_id"] == result_b.run_id
    assert all(result_b.run_id in p.name for p in (output / TENANT / "users" / "changes").iterdir())


def test_a_missing_snapshot_with_a_saved_delta_link_means_a_full_sync(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph, tmp_path: Path
) -> None:
    populate(fake_graph, TENANT, users=120, groups=0)
    output = tmp_path / "out"
    config = _config(graphsync_config, fake_graph, output)
    assert run_graphsync("sync", "--config", str(config)).returncode == 0
    (output / TENANT / "users" / "snapshot.jsonl").unlink()  # an operator, or a lifecycle rule
    mutate(fake_graph, TENANT, random.Random(3), changes=10)
    result = run_graphsync("sync", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "snapshot of contoso.onmicrosoft.com/users is missing; doing a full sync" in result.stderr
    assert _snapshot(output) == _truth(fake_graph)
    assert len(list((output / TENANT / "users" / "changes").glob("*-full.jsonl"))) == 2


def test_a_refused_token_fails_every_run_cleanly_and_is_recorded(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    fake_graph: FakeGraph,
    fake_entra: FakeEntra,
    tmp_path: Path,
) -> None:
    populate(fake_graph, TENANT, users=5, groups=2)
    output = tmp_path / "out"
    config = _config(graphsync_config, fake_graph, output, jobs=["users", "groups"])
    fake_entra.fail_next(10, status=401, error="invalid_client", description="AADSTS7000215: Invalid client secret.")
    result = run_graphsync("sync", "--config", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()[1:]]
    assert [(row[1], row[5].split(":")[0]) for row in rows] == [("users", "failed"), ("groups", "failed")]
    for job in ("users", "groups"):
        state = json.loads((output / TENANT / job / "state.json").read_text())
        assert "AADSTS7000215" in state["last_error"]
        assert not (output / TENANT / job / "snapshot.jsonl").exists()


def _store_state(work: Path) -> tuple[dict[str, str], bytes]:
    """A working store's tag and the snapshot it would print, read with plain sqlite3 and the store's own reader."""
    path = WorkStores(work).path(TENANT, "users")
    with contextlib.closing(sqlite3.connect(path)) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    store = SnapshotStore(path)
    try:
        return meta, b"".join(store.lines())
    finally:
        store.close()


def test_a_truncated_page_fetched_ahead_fails_the_run_after_the_page_before_it_and_advances_nothing(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, tmp_path: Path
) -> None:
    """The 4th page of a delta round comes back cut off while the round is still applying the 3rd (read-ahead):
    the error surfaces in page order, nothing after the bad page is fetched, and no output or store advances."""
    populate(fake_graph, TENANT, users=500, groups=0, seed=21)
    output, work = tmp_path / "out", tmp_path / "work"
    settings = load_settings(_config(graphsync_config, fake_graph, output))
    store = BlobStore.from_settings(settings.storage)
    graph = GraphClient(settings.graph.endpoint, "v1.0", TokenCaches.from_settings(settings, store))
    [job] = settings.jobs
    runner = JobRunner(
        graph=graph, sink=sink_from_settings(settings), locks=store, stores=WorkStores(work), replica="replica-a"
    )
    assert runner.run(job, TENANT).status == "ok"
    job_dir = output / TENANT / "users"
    snapshot, state = (job_dir / "snapshot.jsonl").read_bytes(), json.loads((job_dir / "state.json").read_text())
    changes = sorted(p.name for p in (job_dir / "changes").iterdir())
    store_before = _store_state(work)
    assert store_before[1] == snapshot

    mutate(fake_graph, TENANT, random.Random(22), changes=60)
    fake_graph.page_size = 3  # a delta round of many pages
    mark = len(fake_graph.requests)
    seen: list[tuple[int, int]] = []  # (pages applied, pages Graph had answered by then)

    def answered() -> int:
        return len(fake_graph.requests) - mark

    def wait_for(pages: int) -> None:
        deadline = time.monotonic() + 20
        while answered() < pages:
            assert time.monotonic() < deadline, f"page {pages} was not fetched while the round applied the one before"
            time.sleep(0.01)

    def applying(tenant: str, job_name: str, pages: int, records: int) -> None:
        wait_for(pages + 1)  # the next page arrives while this run is still here, applying this one
        if pages == 2:  # page 3 is in: the next request, page 4, will be cut off
            fake_graph.fail_next(1, body=TRUNCATED, tenant=TENANT)
        seen.append((pages, answered()))

    result = runner.run(job, TENANT, progress=applying)

    assert result.status == "failed" and "not valid JSON" in result.message, result.message
    assert seen == [(1, 2), (2, 3), (3, 4)], "each page was fetched while the one before it was applied"
    assert answered() == 4, "nothing was fetched after the truncated page"
    assert fake_graph.requests[-1].status == 200  # cut off, not an HTTP error
    assert (job_dir / "snapshot.jsonl").read_bytes() == snapshot
    state_after = json.loads((job_dir / "state.json").read_text())
    assert state_after["delta_link"] == state["delta_link"] and state_after["last_error"] == result.message
    assert sorted(p.name for p in (job_dir / "changes").iterdir()) == changes
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.endswith("-journal")]
    assert _store_state(work) == store_before, "the working store moved"

    fake_graph.page_size = 100
    assert runner.run(job, TENANT).status == "ok"
    assert _snapshot(output) == _truth(fake_graph)
