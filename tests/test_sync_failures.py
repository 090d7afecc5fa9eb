"""Sync runs that go wrong in the ways a fleet really does: a lost lock, a vanished snapshot, a refused token."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from azure.storage.blob import BlobLeaseClient, BlobServiceClient

from graphsync.config import load_settings
from graphsync.graph import GraphClient
from graphsync.jobs import JobRunner, lock_blob
from graphsync.sinks import sink_from_settings
from graphsync.storage import BlobStore
from graphsync.tokencache import TokenCaches
from graphsync.workstore import WorkStores
from tests.fakes.graph import FakeGraph, mutate, populate

if TYPE_CHECKING:
    from tests.conftest import Azurite, RunGraphsync, WriteConfig
    from tests.fakes.entra import FakeEntra

TENANT = "contoso.onmicrosoft.com"
SELECT = ["id", "displayName", "mail"]


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
