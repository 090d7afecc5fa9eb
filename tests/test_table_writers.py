"""The table writer in-process: many tenants committing to one table at once, the layout, the storage options.

Concurrency is what a fleet does: replicas run different tenants' rounds at the same moment, all committing to the
same ``users`` table. Each tenant's MERGE names its partition as a literal, so delta-rs's conflict checker lets
commits of other tenants through, and what still collides is retried. Azure answers a commit collision (a
create-only PUT of ``_delta_log/<version>.json`` that another writer made first) with 412 where Azurite answers 409;
the relay plays Azure's answer so that both surfaces are exercised.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pydantic import ValidationError

from graphsync.config import JobSettings, Settings
from graphsync.metrics import TABLE_CONFLICTS_RETRIED
from graphsync.snapshot import SnapshotStore
from graphsync.tables import AppliedRound, TableNeedsFullRound
from graphsync.tables.delta import DeltaTables, StaleRound
from graphsync.tables.layout import Column, job_tables, table_name
from graphsync.tables.location import TableLocation, azure_options, table_location
from graphsync.tables.rows import convert
from tests.conftest import AZURITE_KEY, Azurite
from tests.fakes.storage_relay import StorageRelay

USERS = JobSettings(name="users", resource="users", delta=True, select=["displayName", "accountEnabled"], every="5m")
TENANTS = [f"tenant{n:02d}.onmicrosoft.com" for n in range(6)]


def user(tenant: str, n: int, round_: int) -> dict[str, Any]:
    return {"id": f"{tenant[:8]}-{n:04d}", "displayName": f"User {n} r{round_}", "accountEnabled": n % 2 == 0}


class Tenant:
    """One tenant's working store and the rounds it applies."""

    def __init__(self, tenant: str, directory: Path) -> None:
        self.tenant = tenant
        self.store = SnapshotStore(directory / f"{tenant}.sqlite")
        self.clock = 1_800_000_000.0

    def round(self, records: list[dict[str, Any]], *, full: bool) -> AppliedRound:
        if full:
            self.store.clear()
        self.store.apply(records)
        self.clock += 60
        lines = b"".join(json.dumps(record).encode() + b"\n" for record in records)
        touched = {record["id"] for record in records}
        return AppliedRound(self.tenant, USERS, full, touched, self.store, io.BytesIO(lines), self.clock)

    def rows(self) -> list[tuple[str, str, bool]]:
        objects = (json.loads(line) for line in self.store.lines())
        return sorted((obj["id"], obj["displayName"], obj["accountEnabled"]) for obj in objects)


@pytest.fixture
def relay(azurite: Azurite) -> Iterator[StorageRelay]:
    with StorageRelay(azurite) as relay:
        yield relay


def relay_location(relay: StorageRelay, container: str) -> TableLocation:
    options = {
        "account_name": "devstoreaccount1",
        "account_key": AZURITE_KEY,
        "endpoint": relay.connection_string.split("BlobEndpoint=")[1].rstrip(";"),
        "allow_http": "true",
    }
    return TableLocation(f"az://{container}/tables", options)


@pytest.mark.parametrize("collision", [409, 412])
def test_tenants_committing_to_one_table_at_once_all_land_exactly(
    relay: StorageRelay, blob_container: str, tmp_path: Path, collision: int
) -> None:
    if collision == 412:  # what Azure answers a create-only PUT on an existing blob; Azurite answers 409
        relay.answer(lambda method, blob, status: method == "PUT" and "/_delta_log/" in blob and status == 409, 412)
    tables = DeltaTables(relay_location(relay, blob_container), backoff=0.05)
    tenants = [Tenant(tenant, tmp_path) for tenant in TENANTS]
    tables.apply(tenants[0].round([user(TENANTS[0], 0, 0)], full=True))  # the table exists before the crowd comes
    retried_before = TABLE_CONFLICTS_RETRIED.labels("users")._value.get()
    failures: list[BaseException] = []

    def work(tenant: Tenant) -> None:
        try:
            tables.apply(tenant.round([user(tenant.tenant, n, 0) for n in range(20)], full=True))
            for round_ in (1, 2):
                changed = [user(tenant.tenant, n, round_) for n in range(round_, 20, 4)]
                tables.apply(
                    tenant.round([*changed, {"id": f"{tenant.tenant[:8]}-{round_:04d}", "@removed": {}}], full=False)
                )
        except BaseException as exc:  # the test fails with it below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(tenant,)) for tenant in tenants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures

    table = DeltaTable(tables.location.uri("users"), storage_options=tables.location.storage_options)
    rows = pa.table(table.to_pyarrow_table()).to_pylist()
    for tenant in tenants:
        mine = sorted((r["id"], r["displayName"], r["accountEnabled"]) for r in rows if r["tenant_id"] == tenant.tenant)
        assert mine == tenant.rows(), f"{tenant.tenant}: the table differs from its store"
    assert table.version() == 1 + len(TENANTS) * 3, "one commit per tenant and round, none lost"
    collided = [r for r in relay.records() if r.method == "PUT" and "/_delta_log/" in r.blob and r.status == collision]
    assert collided, f"the writers collided (answered {collision}) and were retried"
    if collision == 412:  # delta-rs 1.6 gives up on a 412 (an OSError): the writer retried it from a fresh read
        assert TABLE_CONFLICTS_RETRIED.labels("users")._value.get() > retried_before


def test_a_round_older_than_the_one_a_table_holds_is_refused(tmp_path: Path) -> None:
    tables = DeltaTables(TableLocation(str(tmp_path / "tables")))
    tenant = Tenant(TENANTS[0], tmp_path)
    tables.apply(tenant.round([user(TENANTS[0], n, 0) for n in range(3)], full=True))
    old = tenant.round([user(TENANTS[0], 2, 1)], full=False)
    new = tenant.round([user(TENANTS[0], 1, 2)], full=False)
    tables.apply(new)
    with pytest.raises(StaleRound, match="newer round"):
        tables.apply(old)


def test_a_delta_round_into_a_table_deleted_meanwhile_writes_nothing_and_the_next_run_is_full(tmp_path: Path) -> None:
    tables = DeltaTables(TableLocation(str(tmp_path / "tables")))
    tenant = Tenant(TENANTS[0], tmp_path)
    tables.apply(tenant.round([user(TENANTS[0], n, 0) for n in range(3)], full=True))
    assert not tables.needs_full(TENANTS[0], USERS), "known to hold the job: no table opened"
    shutil.rmtree(tmp_path / "tables" / "users_history")  # an operator deletes a table under a running daemon
    with pytest.raises(TableNeedsFullRound, match="table users_history holds no round of graphsync/"):
        tables.apply(tenant.round([user(TENANTS[0], 1, 1)], full=False))
    assert DeltaTable(tables.location.uri("users_history")).to_pyarrow_table().num_rows == 0, "nothing written"
    assert tables.needs_full(TENANTS[0], USERS), "the next run is a full round"


def test_a_table_without_the_tenants_rounds_asks_for_a_full_round(tmp_path: Path) -> None:
    tables = DeltaTables(TableLocation(str(tmp_path / "tables")))
    tenant = Tenant(TENANTS[0], tmp_path)
    assert tables.needs_full(TENANTS[0], USERS), "no table yet"
    tables.apply(tenant.round([user(TENANTS[0], 0, 0)], full=True))
    assert not tables.needs_full(TENANTS[0], USERS)
    assert tables.needs_full(TENANTS[1], USERS), "the table holds no round of this tenant"
    before = DeltaTable(tables.location.uri("users")).version()
    tables.apply(tenant.round([user(TENANTS[0], 0, 0)], full=False))
    assert DeltaTable(tables.location.uri("users")).version() == before, "a round that changes nothing commits nothing"


# -- layout and options (no storage) --------------------------------------------------------------------------------


def test_table_names_and_columns_follow_the_job() -> None:
    assert [table_name(r) for r in ("users", "servicePrincipals", "directoryRoles", "oauth2PermissionGrants")] == [
        "users",
        "service_principals",
        "directory_roles",
        "oauth2_permission_grants",
    ]
    groups = JobSettings(
        name="g",
        resource="groups",
        delta=True,
        select=["id", "displayName", "groupTypes", "members", "owners"],
        every="5m",
    )
    tables = job_tables(groups)
    assert tables is not None
    assert tables.entity.columns == (Column("displayName", "string"), Column("groupTypes", "json"))
    assert [(t.name, t.keys, t.link) for t in tables.edges] == [
        ("group_members", ("group_id", "member_id"), "members"),
        ("group_owners", ("group_id", "owner_id"), "owners"),
    ]
    managed = job_tables(
        JobSettings(name="u", resource="users", delta=True, select=["mail"], expand=["manager"], every="5m")
    )
    assert managed is not None and managed.entity.columns[-1] == Column("manager_id", "string")
    sign_ins = JobSettings(
        name="s", resource="auditLogs/signIns", cursor="createdDateTime", select=["appId", "status"], every="5m"
    )
    log = job_tables(sign_ins).entity  # a log read by time: an append-only table, its time column typed
    assert (log.name, log.keys, log.log_time, log.history) == ("sign_ins", ("id",), "createdDateTime", False)
    assert log.columns == (Column("appId", "string"), Column("status", "json"), Column("createdDateTime", "timestamp"))


def test_values_take_their_column_type_and_complex_ones_are_json() -> None:
    moment = convert(Column("t", "timestamp"), "2024-05-01T12:00:00.1234567Z", "x")
    assert moment.isoformat() == "2024-05-01T12:00:00.123456+00:00"
    assert convert(Column("t", "timestamp"), "2024-05-01T12:00:00", "x").utcoffset() is not None, "never naive"
    assert convert(Column("j", "json"), {"b": 1, "a": [True]}, "x") == '{"a":[true],"b":1}'
    assert convert(Column("j", "json"), "text", "x") == '"text"'
    assert convert(Column("s", "string"), "text", "x") == "text"
    with pytest.raises(ValueError, match=r"users\.accountEnabled of u1: expected a boolean"):
        convert(Column("b", "boolean"), "yes", "users.accountEnabled of u1")


def test_the_tables_live_under_the_output_with_the_accounts_options(tmp_path: Path) -> None:
    key = AZURITE_KEY
    connection = f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    settings = Settings(
        identity={"client_id": "c", "tenants": ["contoso.onmicrosoft.com"], "client_secret": "s"},
        storage={"connection_string": connection},
        output={"container": "exports", "tables": True},
    )
    location = table_location(settings)
    assert location.uri("users") == "az://exports/tables/users"
    assert location.storage_options == {
        "account_key": key,
        "account_name": "devstoreaccount1",
        "endpoint": "http://127.0.0.1:10000/devstoreaccount1",
        "allow_http": "true",
    }
    assert key not in repr(location) and key not in location.describe()
    public = Settings(
        identity={"client_id": "c", "tenants": ["contoso.onmicrosoft.com"], "client_secret": "s"},
        storage={"account_url": "https://acct.blob.core.windows.net"},
        output={"directory": str(tmp_path)},
    )
    assert azure_options(public.storage) == {"account_name": "acct", "endpoint": "https://acct.blob.core.windows.net"}
    assert table_location(public).uri("groups") == f"{tmp_path}/tables/groups"


def test_with_tables_a_job_needs_select_and_one_job_per_tenant_writes_a_table() -> None:
    def settings(*jobs: dict[str, Any]) -> Settings:
        return Settings(
            identity={"client_id": "c", "tenants": ["a.onmicrosoft.com", "b.onmicrosoft.com"], "client_secret": "s"},
            storage={"account_url": "https://acct.blob.core.windows.net"},
            output={"directory": "/tmp/out", "tables": True},
            jobs=list(jobs),
        )

    users = {"name": "users", "resource": "users", "delta": True, "select": ["mail"], "every": "5m"}
    with pytest.raises(ValidationError, match=r"jobs\[0\]\.select: is required with output\.tables"):
        settings({**users, "select": None})
    with pytest.raises(ValidationError, match=r"jobs\[1\]\.resource: jobs\[0\] exports users for b\.onmicrosoft\.com"):
        settings(users, {**users, "name": "more-users", "tenants": ["b.onmicrosoft.com"]})
    settings(
        {**users, "tenants": ["a.onmicrosoft.com"]}, {**users, "name": "b-users", "tenants": ["b.onmicrosoft.com"]}
    )
    log = {"name": "sign-ins", "resource": "auditLogs/signIns", "cursor": "createdDateTime", "every": "5m"}
    with pytest.raises(ValidationError, match=r"jobs\[0\]\.select: is required with output\.tables"):
        settings(log)  # a log's table takes its columns from select too
    settings({**log, "select": ["appId"]})


def test_a_property_added_to_select_adds_a_column_without_rewriting_the_table(tmp_path: Path) -> None:
    tables = DeltaTables(TableLocation(str(tmp_path / "tables")))
    tenant = Tenant(TENANTS[0], tmp_path)
    tables.apply(tenant.round([user(TENANTS[0], n, 0) for n in range(5)], full=True))
    uri = tables.location.uri("users")
    files_before = set(DeltaTable(uri).file_uris())

    wider = USERS.model_copy(update={"select": [*(USERS.select or []), "mail"]})
    records = [{**user(TENANTS[0], n, 0), "mail": f"u{n}@example.com" if n < 2 else None} for n in range(5)]
    tenant.store.clear()
    tenant.store.apply(records)
    tenant.clock += 60
    lines = io.BytesIO(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    tables.apply(AppliedRound(TENANTS[0], wider, True, {r["id"] for r in records}, tenant.store, lines, tenant.clock))

    table = DeltaTable(uri)
    operations = [entry["operation"] for entry in reversed(table.history())]
    assert operations[-2:] == ["ADD COLUMN", "MERGE"], operations
    added_column = DeltaTable(uri, version=table.version() - 1)
    assert set(added_column.file_uris()) == files_before, "adding the column rewrote no data file"
    assert "mail" in pa.schema(added_column.schema().to_arrow()).names
    mails = {r["id"]: r["mail"] for r in table.to_pyarrow_table().to_pylist()}
    assert sorted(mails.values(), key=str) == [None, None, None, "u0@example.com", "u1@example.com"]


def test_a_table_the_first_round_leaves_empty_still_records_the_round(tmp_path: Path) -> None:
    groups = JobSettings(name="groups", resource="groups", delta=True, select=["displayName", "owners"], every="5m")
    store = SnapshotStore(tmp_path / "groups.sqlite")
    records = [{"id": "g1", "displayName": "Ownerless", "owners@delta": []}]
    store.apply(records)
    tables = DeltaTables(TableLocation(str(tmp_path / "tables")))
    assert tables.needs_full(TENANTS[0], groups)
    lines = io.BytesIO(json.dumps(records[0]).encode() + b"\n")
    tables.apply(AppliedRound(TENANTS[0], groups, True, {"g1"}, store, lines, 1_800_000_000.0))
    assert DeltaTable(tables.location.uri("group_owners")).to_pyarrow_table().num_rows == 0
    assert not tables.needs_full(TENANTS[0], groups), "the next round is a delta round, not another full one"
