"""Delta Lake tables kept current by every round (``[output] tables = true``), through real `graphsync sync` runs.

The oracle is what each run publishes beside the tables: every tenant's JSONL snapshot (which test_sync holds equal
to the fake's directory) and its change files. After every run, every table read back with ``deltalake`` and with
Polars must equal the snapshots, row for row; the Change Data Feed of the run must be exactly the change its
change files made; the history must answer "members of G at T". Each scenario runs against a directory and against
a container in Azurite.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.blob import BlobLeaseClient, BlobServiceClient, ContainerClient
from deltalake import DeltaTable

from tests.conftest import REPO_ROOT
from tests.fakes.graph import FakeGraph, mutate, populate
from tests.fakes.storage_relay import StorageRelay
from tests.test_sync import output_text

if TYPE_CHECKING:
    from tests.conftest import Azurite, RunGraphsync, WriteConfig

TENANTS = ("contoso.onmicrosoft.com", "fabrikam.onmicrosoft.com")
USER_SELECT = ["displayName", "mail", "jobTitle", "accountEnabled", "createdDateTime"]
GROUP_SELECT = ["displayName", "description", "securityEnabled", "members", "owners"]
ROLE_SELECT = ["displayName", "roleTemplateId", "members"]
JOBS = [
    {"name": "users", "resource": "users", "delta": True, "select": USER_SELECT, "expand": ["manager"], "every": "5m"},
    {"name": "groups", "resource": "groups", "delta": True, "select": GROUP_SELECT, "every": "5m"},
    {"name": "roles", "resource": "directoryRoles", "delta": True, "select": ROLE_SELECT, "every": "5m"},
]
JOB_NAMES = ("users", "groups", "roles")
CURRENT = ("users", "groups", "group_members", "group_owners", "directory_roles", "directory_role_members")
WITH_HISTORY = ("users", "groups", "group_members", "group_owners", "directory_role_members")
TABLES = CURRENT + tuple(f"{name}_history" for name in WITH_HISTORY)
CHANGE_TYPES = ("insert", "update_postimage", "delete")


# -- the output as a consumer reads it --------------------------------------------------------------------------


@dataclass
class Output:
    """Snapshots, change files and tables of one output, a directory or a container."""

    table_root: str
    storage_options: dict[str, str]
    directory: Path | None = None
    container: ContainerClient | None = None

    def _read(self, name: str) -> bytes | None:
        if self.directory is not None:
            path = self.directory / name
            return path.read_bytes() if path.exists() else None
        assert self.container is not None
        try:
            return self.container.download_blob(name).readall()
        except ResourceNotFoundError:
            return None

    def snapshot(self, tenant: str, job: str) -> dict[str, dict[str, Any]]:
        data = self._read(f"{tenant}/{job}/snapshot.jsonl")
        assert data is not None, f"no snapshot of {tenant}/{job}"
        return {obj["id"]: obj for obj in map(json.loads, data.splitlines())}

    def state(self, tenant: str, job: str) -> dict[str, Any]:
        data = self._read(f"{tenant}/{job}/state.json")
        assert data is not None
        return dict(json.loads(data))

    def change_files(self, tenant: str, job: str) -> dict[str, bytes]:
        prefix = f"{tenant}/{job}/changes/"
        if self.directory is not None:
            folder = self.directory / prefix
            return {path.name: path.read_bytes() for path in folder.iterdir()} if folder.is_dir() else {}
        assert self.container is not None
        return {
            blob.name.removeprefix(prefix): self.container.download_blob(blob.name).readall()
            for blob in self.container.list_blobs(name_starts_with=prefix)
        }

    def table(self, name: str) -> DeltaTable:
        return DeltaTable(f"{self.table_root}/{name}", storage_options=self.storage_options)

    def rows(self, name: str) -> list[dict[str, Any]]:
        """The table as deltalake reads it."""
        return list(self.table(name).to_pyarrow_table().to_pylist())

    def polars(self, name: str) -> pl.DataFrame:
        return pl.read_delta(f"{self.table_root}/{name}", storage_options=self.storage_options)

    def versions(self) -> dict[str, int]:
        return {name: self.table(name).version() for name in TABLES}

    def changes(self, name: str, after: int) -> list[dict[str, Any]]:
        """The Change Data Feed of the versions after ``after``, in commit order."""
        table = self.table(name)
        if table.version() <= after:
            return []
        feed = pa.table(table.load_cdf(starting_version=after + 1)).to_pylist()
        return sorted(feed, key=lambda row: row["_commit_version"])


def azurite_options(azurite: Azurite) -> dict[str, str]:
    """What a consumer hands delta-rs for Azurite: the account, its key and the emulator's endpoint."""
    from tests.fakes.azurite import AZURITE_ACCOUNT, AZURITE_KEY

    return {
        "account_name": AZURITE_ACCOUNT,
        "account_key": AZURITE_KEY,
        "endpoint": f"http://{azurite.host}:{azurite.port}/{AZURITE_ACCOUNT}",
        "allow_http": "true",
    }


@pytest.fixture(params=["directory", "container"])
def output(request: pytest.FixtureRequest, tmp_path: Path, azurite: Azurite, blob_container: str) -> Iterator[Output]:
    if request.param == "directory":
        yield Output(str(tmp_path / "out" / "tables"), {}, directory=tmp_path / "out")
        return
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        yield Output(
            f"az://{blob_container}/tables",
            azurite_options(azurite),
            container=service.get_container_client(blob_container),
        )


def output_settings(output: Output) -> dict[str, Any]:
    if output.directory is not None:
        return {"directory": str(output.directory), "tables": True}
    assert output.container is not None
    return {"container": output.container.container_name, "tables": True}


# -- what the tables must hold, from the snapshots ----------------------------------------------------------------


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).astimezone(UTC)


def expected_rows(output: Output) -> dict[str, list[dict[str, Any]]]:
    """Every table's rows as the snapshots of both tenants say they must be."""
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in CURRENT}
    for tenant in TENANTS:
        for oid, user in output.snapshot(tenant, "users").items():
            row = {name: user.get(name) for name in USER_SELECT} | {"createdDateTime": _time(user["createdDateTime"])}
            tables["users"].append({"tenant_id": tenant, "id": oid, **row, "manager_id": user["manager"]})
        for oid, group in output.snapshot(tenant, "groups").items():
            properties = {name: group[name] for name in GROUP_SELECT[:-2]}
            tables["groups"].append({"tenant_id": tenant, "id": oid, **properties})
            tables["group_members"] += [
                {"tenant_id": tenant, "group_id": oid, "member_id": member, "member_type": "user"}
                for member in group["members"]
            ]
            tables["group_owners"] += [
                {"tenant_id": tenant, "group_id": oid, "owner_id": owner, "owner_type": "user"}
                for owner in group["owners"]
            ]
        for oid, role in output.snapshot(tenant, "roles").items():
            properties = {name: role[name] for name in ROLE_SELECT[:-1]}
            tables["directory_roles"].append({"tenant_id": tenant, "id": oid, **properties})
            tables["directory_role_members"] += [
                {"tenant_id": tenant, "role_id": oid, "member_id": member, "member_type": "user"}
                for member in role["members"]
            ]
    return tables


def canonical(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(
        json.dumps(row, sort_keys=True, default=lambda value: value.astimezone(UTC).isoformat()) for row in rows
    )


def assert_tables_equal_the_snapshots(output: Output) -> None:
    for name, rows in expected_rows(output).items():
        want = canonical(rows)
        assert canonical(output.rows(name)) == want, f"{name} (deltalake) differs from the snapshots"
        assert canonical(output.polars(name).to_dicts()) == want, f"{name} (Polars) differs from the snapshots"
        if name not in WITH_HISTORY:
            continue
        history = [row for row in output.rows(f"{name}_history") if row.pop("is_current")]
        for row in history:
            assert row.pop("valid_to") is None
            row.pop("valid_from")
        assert canonical(history) == want, f"{name}_history's current rows differ from {name}"


# -- running graphsync --------------------------------------------------------------------------------------------


@dataclass
class Runs:
    """`graphsync sync` over both tenants, remembering what each run published."""

    run_graphsync: RunGraphsync
    config: Path
    output: Output
    snapshots: dict[tuple[str, str], dict[str, dict[str, Any]]] = field(default_factory=dict)
    files: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def sync(self) -> None:
        result = self.run_graphsync("sync", "--config", str(self.config))
        assert result.returncode == 0, output_text(result)
        assert "Traceback" not in result.stderr, output_text(result)

    def new_change_lines(self, tenant: str, job: str) -> list[dict[str, Any]]:
        files = self.output.change_files(tenant, job)
        new = sorted(files.keys() - self.files.get((tenant, job), set()))
        self.files[(tenant, job)] = set(files)
        return [json.loads(line) for name in new for line in files[name].splitlines()]

    def remember(self) -> None:
        for tenant in TENANTS:
            for job in JOB_NAMES:
                self.snapshots[(tenant, job)] = self.output.snapshot(tenant, job)


@pytest.fixture
def runs(graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, output: Output) -> Runs:
    config = graphsync_config(
        tenants=TENANTS,
        extra={"graph": {"endpoint": fake_graph.base_url}, "output": output_settings(output), "jobs": JOBS},
    )
    return Runs(run_graphsync, config, output)


ROLES = ("Global Administrator", "User Administrator", "Security Reader")


def seed(fake: FakeGraph) -> None:
    for number, tenant in enumerate(TENANTS):
        populate(fake, tenant, users=80, groups=12, seed=40 + number)
        users = list(fake.objects(tenant, "users"))
        for index in range(1, 30):
            fake.set_manager(tenant, users[index], users[index // 5])
        for index in range(0, 40, 3):
            fake.update(tenant, "users", users[index], accountEnabled=index % 2 == 0, createdDateTime=stamp(index))
        for index, group in enumerate(list(fake.objects(tenant, "groups"))[:10]):
            fake.set_owners(tenant, group, users[index : index + index % 3])
        for index, name in enumerate(ROLES):
            role = {"id": f"role-{index}-{number}", "displayName": name, "roleTemplateId": f"template-{index}"}
            fake.add(tenant, "directoryRoles", {**role, "members": users[index * 3 : index * 3 + 2]})


def stamp(index: int) -> str:
    return f"2024-0{1 + index % 9}-1{index % 10}T08:{index % 60:02d}:00.1234567Z"


def change_links_and_types(fake: FakeGraph, tenant: str, rng: random.Random) -> None:
    """Changes `mutate` does not make: managers set, changed and removed; owners and role members added and removed;
    typed properties set and cleared."""
    users = list(fake.objects(tenant, "users"))
    for user in rng.sample(users, 4):
        fake.set_manager(tenant, user, rng.choice([None, *rng.sample(users, 2)]))
    fake.update(tenant, "users", rng.choice(users), accountEnabled=False, createdDateTime=stamp(rng.randrange(60)))
    fake.update(tenant, "users", rng.choice(users), createdDateTime=None)
    owners = fake.owners(tenant)
    for group in rng.sample(sorted(owners), 2):
        fake.set_owners(tenant, group, [*owners[group][1:], *rng.sample(users, rng.randint(0, 2))])
    roles = fake.objects(tenant, "directoryRoles")
    role = rng.choice(sorted(roles))
    fake.add_members(tenant, role, rng.sample(users, 1), resource="directoryRoles")
    fake.remove_members(tenant, role, roles[role]["members"][:1], resource="directoryRoles")


# -- the CDF of a run is the change its change files made ----------------------------------------------------------


def net_feed(feed: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple[str, ...], dict[str, Any] | None]:
    """Each key's row after the feed (None: deleted), from its inserts, update post-images and deletes."""
    net: dict[tuple[str, ...], dict[str, Any] | None] = {}
    for row in feed:
        if row["_change_type"] not in CHANGE_TYPES:
            continue
        key = tuple(row[name] for name in keys)
        data = {k: v for k, v in row.items() if not k.startswith("_")}
        net[key] = None if row["_change_type"] == "delete" else data
    return net


def assert_feed_is_the_change(
    runs: Runs, before: dict[str, int], previous: dict[tuple[str, str], dict[str, dict[str, Any]]]
) -> None:
    """For each tenant: the users and group_members rows the run's CDF changed are exactly those whose snapshot
    lines differ, with their new values, and every one of them is named in the run's change file."""
    expected = {name: {canonical([row])[0] for row in rows} for name, rows in expected_rows(runs.output).items()}
    users_feed = net_feed(runs.output.changes("users", before["users"]), ("tenant_id", "id"))
    members_feed = net_feed(
        runs.output.changes("group_members", before["group_members"]), ("tenant_id", "group_id", "member_id")
    )
    for tenant in TENANTS:
        lines = runs.new_change_lines(tenant, "users")
        old, new = previous[(tenant, "users")], runs.output.snapshot(tenant, "users")
        differing = {oid for oid in old.keys() | new.keys() if old.get(oid) != new.get(oid)}
        fed = {key[1]: row for key, row in users_feed.items() if key[0] == tenant}
        assert fed.keys() == differing, f"{tenant}: the users CDF names other rows than the change file changed"
        assert fed.keys() <= {line["id"] for line in lines}
        for oid, row in fed.items():
            assert (row is None) == (oid not in new)
            assert row is None or canonical([row])[0] in expected["users"]

        runs.new_change_lines(tenant, "groups")
        old_groups, new_groups = previous[(tenant, "groups")], runs.output.snapshot(tenant, "groups")
        pairs = lambda groups: {(g, m) for g, group in groups.items() for m in group["members"]}  # noqa: E731
        moved = pairs(old_groups) ^ pairs(new_groups)
        fed_members = {key[1:]: row for key, row in members_feed.items() if key[0] == tenant}
        assert fed_members.keys() == moved, f"{tenant}: the group_members CDF differs from the membership change"
        for pair, row in fed_members.items():
            assert (row is None) == (pair not in pairs(new_groups))


# -- "members of G at T" -----------------------------------------------------------------------------------------


def members_at(output: Output, tenant: str, group: str, moment: datetime) -> set[str]:
    """The documented query, in Polars: the group's member rows valid at ``moment``."""
    history = output.polars("group_members_history")
    rows = history.filter(
        (pl.col("tenant_id") == tenant)
        & (pl.col("group_id") == group)
        & (pl.col("valid_from") <= moment)
        & (pl.col("valid_to").is_null() | (pl.col("valid_to") > moment))
    )
    return set(rows["member_id"].to_list())


# -- the scenarios -----------------------------------------------------------------------------------------------


def assert_typed_partitioned_and_readable_by_fabric(output: Output) -> None:
    users = output.table("users")
    types = {field.name: str(field.type) for field in pa.schema(users.schema().to_arrow())}
    assert types == {
        "tenant_id": "string",
        "id": "string",
        "displayName": "string",
        "mail": "string",
        "jobTitle": "string",
        "accountEnabled": "bool",
        "createdDateTime": "timestamp[us, tz=UTC]",
        "manager_id": "string",
    }
    assert users.metadata().partition_columns == ["tenant_id"]
    assert users.metadata().configuration.get("delta.enableChangeDataFeed") == "true"
    protocol = users.protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 4), "no timestamp_ntz: readable by Fabric"


def test_random_rounds_over_two_tenants_keep_every_table_equal_to_the_snapshots(
    runs: Runs, fake_graph: FakeGraph, output: Output
) -> None:
    seed(fake_graph)
    runs.sync()
    assert_tables_equal_the_snapshots(output)
    assert_typed_partitioned_and_readable_by_fabric(output)
    runs.remember()
    full_rounds = {(t, job): output.state(t, job)["last_full_round"] for t in TENANTS for job in JOB_NAMES}
    for tenant in TENANTS:
        for job in JOB_NAMES:
            runs.new_change_lines(tenant, job)
    moments: list[tuple[datetime, dict[tuple[str, str], dict[str, dict[str, Any]]]]] = []

    rng = random.Random(14)
    for _ in range(2):
        moments.append((datetime.now(UTC), dict(runs.snapshots)))
        time.sleep(0.01)
        for tenant in TENANTS:
            mutate(fake_graph, tenant, rng, changes=25)
            change_links_and_types(fake_graph, tenant, rng)
        before = output.versions()
        runs.sync()
        assert_tables_equal_the_snapshots(output)
        assert_feed_is_the_change(runs, before, runs.snapshots)
        runs.remember()
        assert {key: output.state(*key)["last_full_round"] for key in full_rounds} == full_rounds, (
            "once the tables hold a tenant's job, its rounds are delta rounds again"
        )
    moments.append((datetime.now(UTC), dict(runs.snapshots)))

    before = output.versions()
    runs.sync()
    assert output.versions() == before, "a run that received no change commits nothing to any table"

    # "members of G at T" for three times: before each round, and after the last
    for moment, snapshots in moments:
        for tenant in TENANTS:
            for group, obj in snapshots[(tenant, "groups")].items():
                assert members_at(output, tenant, group, moment) == set(obj["members"]), f"{group} at {moment}"


# -- a kill between the table commit and state.json ----------------------------------------------------------------


def break_leases(azurite: Azurite, container: str) -> None:
    """The killed run's job leases would expire in 30 s: break them, as an operator would."""
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        for blob in service.get_container_client(container).list_blobs(name_starts_with="locks/"):
            with contextlib.suppress(HttpResponseError):  # not leased
                BlobLeaseClient(service.get_blob_client(container, blob.name)).break_lease(lease_break_period=0)


def test_a_sigkill_between_the_table_commit_and_state_json_loses_and_duplicates_nothing(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    run_graphsync: RunGraphsync,
    azurite: Azurite,
    blob_container: str,
    tls_env: dict[str, str],
) -> None:
    tenant = TENANTS[0]
    with StorageRelay(azurite) as relay, BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        output = Output(
            f"az://{blob_container}/tables",
            azurite_options(azurite),
            container=service.get_container_client(blob_container),
        )
        config = graphsync_config(
            tenants=TENANTS,
            extra={
                "graph": {"endpoint": fake_graph.base_url},
                "storage": {"connection_string": relay.connection_string},
                "output": output_settings(output),
                "jobs": JOBS,
            },
        )
        runs = Runs(run_graphsync, config, output)
        seed(fake_graph)
        runs.sync()
        runs.remember()
        cursor = output.state(tenant, "users")["delta_link"]
        mutate(fake_graph, tenant, random.Random(99), changes=30)
        change_links_and_types(fake_graph, tenant, random.Random(98))
        before = output.versions()

        state_blob = f"{blob_container}/{tenant}/users/state.json"
        hold = relay.hold(lambda method, blob, comp: (method, blob) == ("PUT", state_blob))
        process = subprocess.Popen(
            [sys.executable, "-m", "graphsync", "sync", "--config", str(config)],
            cwd=REPO_ROOT,
            env={**os.environ, **tls_env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert hold.arrived.wait(60), "the run never came to save its state"
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        finally:
            hold.drop()
            if process.poll() is None:
                process.kill()
        assert output.state(tenant, "users")["delta_link"] == cursor, "the cursor did not move"
        killed = {
            key: row for key, row in net_feed(output.changes("users", before["users"]), ("tenant_id", "id")).items()
        }
        assert any(key[0] == tenant for key in killed), "the killed run had committed the round to the users table"

        break_leases(azurite, blob_container)
        runs.sync()  # fetches the same round again, from the same link
        assert_tables_equal_the_snapshots(output)
        feed = [row for row in output.changes("users", before["users"]) if row["tenant_id"] == tenant]
        events = collections.Counter(row["id"] for row in feed if row["_change_type"] in CHANGE_TYPES)
        old, new = runs.snapshots[(tenant, "users")], output.snapshot(tenant, "users")
        differing = {oid for oid in old.keys() | new.keys() if old.get(oid) != new.get(oid)}
        assert events == dict.fromkeys(differing, 1), "every change is in the users CDF once, none lost, none twice"


def test_a_table_deleted_under_a_job_is_refilled_by_a_full_round_in_the_same_run(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, tmp_path: Path
) -> None:
    import shutil

    output = Output(str(tmp_path / "out" / "tables"), {}, directory=tmp_path / "out")
    config = graphsync_config(
        tenants=TENANTS,
        extra={"graph": {"endpoint": fake_graph.base_url}, "output": output_settings(output), "jobs": JOBS},
    )
    runs = Runs(run_graphsync, config, output)
    seed(fake_graph)
    runs.sync()
    assert all(output.state(t, job)["tables"] is True for t in TENANTS for job in JOB_NAMES), "recorded in state"
    full_rounds = {t: output.state(t, "users")["last_full_round"] for t in TENANTS}

    shutil.rmtree(tmp_path / "out" / "tables" / "users_history")  # an operator deletes a table
    for tenant in TENANTS:
        mutate(fake_graph, tenant, random.Random(5), changes=10)
    runs.sync()
    assert_tables_equal_the_snapshots(output)  # users_history's current rows too: refilled by a full round
    assert all(output.state(t, "users")["last_full_round"] > full_rounds[t] for t in TENANTS), "a full round ran"
