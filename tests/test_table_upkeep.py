"""The tables' upkeep: once per slot fleet-wide, compacting each tenant's partition without changing a row or taking a
file from a reader, then a checkpoint that lets readers skip the log.

In-process: tables in a directory (the upkeep is delta-rs either way), leases in Azurite as the fleet takes them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
from azure.storage.blob import ContainerClient
from deltalake import DeltaTable

from graphsync.sinks import DirectorySink
from graphsync.storage import BlobStore
from graphsync.tables.delta import DeltaTables
from graphsync.tables.location import TableLocation
from graphsync.upkeep import UpkeepRunner
from tests.conftest import Azurite
from tests.test_table_writers import TENANTS, Tenant, user

SLOT = 1_800_000_000.0


def files_per_tenant(table: DeltaTable) -> dict[str, int]:
    tenants = pa.table(table.get_add_actions(flatten=True)).column("partition.tenant_id").to_pylist()
    return {tenant: tenants.count(tenant) for tenant in set(tenants)}


def test_upkeep_compacts_each_tenant_partition_keeps_every_row_and_file_a_reader_needs_and_checkpoints(
    azurite: Azurite, blob_container: str, tmp_path: Path
) -> None:
    tables = DeltaTables(TableLocation(str(tmp_path / "out" / "tables")))
    tenants = [Tenant(tenant, tmp_path) for tenant in TENANTS[:3]]
    for tenant in tenants:
        tables.apply(tenant.round([user(tenant.tenant, n, 0) for n in range(20)], full=True))
        for round_ in range(1, 5):  # a round that only adds users adds a file
            tables.apply(tenant.round([user(tenant.tenant, 100 + round_, round_)], full=False))
        tables.apply(tenant.round([user(tenant.tenant, n, 5) for n in range(0, 20, 3)], full=False))
    uri = tables.location.uri("users")
    before = DeltaTable(uri)
    rows_before = sorted(map(str, before.to_pyarrow_table().to_pylist()))
    assert all(count > 1 for count in files_per_tenant(before).values())
    old_version = before.version()

    def runner(name: str) -> UpkeepRunner:
        client = ContainerClient.from_connection_string(azurite.connection_string, blob_container)
        return UpkeepRunner(
            tables=tables,
            names=["users", "users_history", "not_created_yet"],
            sink=DirectorySink(tmp_path / "out"),
            locks=BlobStore(client),
            replica=name,
            clock=lambda: SLOT + 60,
        )

    results = []
    replicas = [runner(name) for name in ("a", "b", "c")]
    threads = [threading.Thread(target=lambda r=r: results.append(r.run(due_after=SLOT))) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(result.status for result in results).count("ok") == 1, [(r.status, r.message) for r in results]
    assert all(result.status in ("ok", "busy", "skipped") for result in results)
    assert runner("d").run(due_after=SLOT).status == "skipped", "the slot is served, fleet-wide"

    after = DeltaTable(uri)
    assert files_per_tenant(after) == {tenant.tenant: 1 for tenant in tenants}, "one file per tenant partition"
    assert sorted(map(str, after.to_pyarrow_table().to_pylist())) == rows_before, "no row changed"
    assert {entry["operation"] for entry in after.history(after.version() - old_version)} >= {"OPTIMIZE"}
    old = DeltaTable(uri, version=old_version)  # a reader still on the version before the upkeep
    assert sorted(map(str, old.to_pyarrow_table().to_pylist())) == rows_before, "vacuum kept its files (7 days)"
    log = Path(uri) / "_delta_log"
    assert (log / f"{after.version():020d}.checkpoint.parquet").exists(), "the latest version is checkpointed"
    assert (log / "_last_checkpoint").exists()

    state = DirectorySink(tmp_path / "out").read_state("tables", "_upkeep")[0]
    assert state is not None and state["tables"]["users"]["partitions_compacted"] == 3
    assert "not_created_yet" not in state["tables"]


def test_upkeep_and_rounds_of_the_same_tenant_interleave_without_losing_a_change(tmp_path: Path) -> None:
    tables = DeltaTables(TableLocation(str(tmp_path / "tables")), backoff=0.05)
    tenant = Tenant(TENANTS[0], tmp_path)
    tables.apply(tenant.round([user(TENANTS[0], n, 0) for n in range(30)], full=True))
    for round_ in range(1, 4):
        tables.apply(tenant.round([user(TENANTS[0], 100 + round_, round_)], full=False))
    stop = threading.Event()
    failures: list[BaseException] = []

    def rounds() -> None:
        round_ = 10
        try:
            while not stop.is_set():
                round_ += 1
                changed = [user(TENANTS[0], n, round_) for n in range(0, 30, 7)]
                tables.apply(tenant.round([*changed, user(TENANTS[0], 100 + round_, round_)], full=False))
        except BaseException as exc:  # the test fails with it below
            failures.append(exc)

    writer = threading.Thread(target=rounds)
    writer.start()
    try:
        for _ in range(3):
            tables.upkeep(["users"], lambda: False)
    finally:
        stop.set()
        writer.join(60)
    assert not failures, failures
    table = DeltaTable(tables.location.uri("users"))
    mine = sorted((r["id"], r["displayName"], r["accountEnabled"]) for r in table.to_pyarrow_table().to_pylist())
    assert mine == tenant.rows(), "compaction and rounds interleaved; the table equals the store"
