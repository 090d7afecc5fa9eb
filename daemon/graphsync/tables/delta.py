"""The tables as Delta Lake tables, written with delta-rs (``deltalake``): one MERGE per table and round, at most.

How a round reaches a table (:meth:`DeltaTables.apply`), for its tenant:

1. read the tenant's rows the round speaks for (one partition: the tables are partitioned by ``tenant_id``);
2. compare them with the rows the round wants (:mod:`graphsync.tables.rows`); equal rows are left alone;
3. if anything differs, one MERGE by (``tenant_id``, key) upserts and deletes exactly the difference, and the
   history table closes the rows that changed (``valid_to``, ``is_current``) and opens their successors.

Comparing first is what makes a round idempotent: a run that re-delivers a round after a crash between the table
commit and ``state.json`` finds the rows already there and commits nothing (or only what changed since), so the
tables and their Change Data Feed hold every change once. A round that changed nothing commits nothing.

Each commit records an app transaction ``graphsync/<tenant>/<job>`` with the round's start time in microseconds:
``needs_full`` reads it to tell that a table never took in the tenant's job (a full round must fill it), and a
round older than the one a table already holds (a replica that lost its job lock and woke up) is refused rather
than written over a newer one. A process remembers which tables hold which jobs, so ``needs_full`` opens a table
once per process, not before every run; a delta round that still meets a table without its job (deleted and
re-created meanwhile) writes nothing to it and raises :class:`TableNeedsFullRound`: the round runner then runs a
full round at once. (A job's state records that its tables hold its rounds, so runs skip ``needs_full`` after that.)
This assumes replicas' clocks agree to within the job lock's 30 s.

Concurrency: every MERGE names its tenant's partition as a literal (``t.tenant_id = '...'``), so delta-rs's
conflict checker sees it read that partition only, and commits of other tenants (other replicas) do not conflict
with it. delta-rs retries a version collision itself; a conflict it cannot resolve (``CommitFailedError``), and a
collision that Azure answers with 412 where object_store expects 409 (delta-rs #3166), are retried here, from a
fresh read, with a short random backoff.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Field, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from graphsync.metrics import TABLE_BYTES_WRITTEN, TABLE_COMMITS, TABLE_CONFLICTS_RETRIED
from graphsync.tables import AppliedRound, LogRecords, TableNeedsFullRound
from graphsync.tables.layout import ID, IS_CURRENT, TENANT_ID, VALID_FROM, VALID_TO, TableSpec, job_tables
from graphsync.tables.location import TableLocation
from graphsync.tables.rows import Key, Values, Wanted, edge_rows, entity_rows, log_rows
from graphsync.tables.upkeep import maintain

if TYPE_CHECKING:
    from graphsync.config import JobSettings

log = logging.getLogger(__name__)

SourceRow = tuple[Key, Values | None, bool]  # a MERGE source row: key, values (None: no values), flag

# Conflicts with other writers are retried for this long, with jittered exponential backoff, rather than a number of
# times: with many writers, a collision on Azure (412: delta-rs gives up at once) costs a whole new read and MERGE.
CONFLICT_SECONDS = 300.0
BACKOFF_SECONDS = 0.2
BACKOFF_CAP_SECONDS = 5.0
DELETED = "_deleted"  # source-only column: the row goes
CLOSE = "_close"  # source-only column of a history MERGE: the row closes a current one
ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "json": pa.string(),
    "boolean": pa.bool_(),
    "integer": pa.int64(),
    # tz-aware: a naive timestamp is Delta's timestamp_ntz (reader 3 / writer 7, unreadable by Fabric's endpoint)
    "timestamp": pa.timestamp("us", tz="UTC"),
}
# A checkpoint every 10 commits rather than Delta's 100: every reader and writer loads the last checkpoint plus the
# JSON commits after it (one GET each), and with a fleet committing all day that is what opening a table costs.
# A checkpoint of these tables is small (a few add actions per tenant), so writing one often is cheap.
CHECKPOINT_PROPERTIES = {"delta.checkpointInterval": "10"}
CURRENT_PROPERTIES = {"delta.enableChangeDataFeed": "true", **CHECKPOINT_PROPERTIES}
HISTORY_COLUMNS = (
    pa.field(VALID_FROM, ARROW_TYPES["timestamp"]),
    pa.field(VALID_TO, ARROW_TYPES["timestamp"]),
    pa.field(IS_CURRENT, pa.bool_()),
)


class StaleRound(Exception):
    """A table already holds a newer round of the same (tenant, job): this run's round must not overwrite it."""


def app_id(tenant: str, job: str) -> str:
    return f"graphsync/{tenant}/{job}"


class DeltaTables:
    """The tables under one location; one instance serves every run of the process (it keeps no table open)."""

    enabled = True

    def __init__(
        self, location: TableLocation, *, conflict_seconds: float = CONFLICT_SECONDS, backoff: float = BACKOFF_SECONDS
    ) -> None:
        self.location = location
        self._conflict_seconds = conflict_seconds
        self._backoff = backoff
        # (table, app transaction) pairs known to hold a round: needs_full opens no table for them again. Opening a
        # table costs its checkpoint and the commits after it; a fleet asks before every run of every job.
        self._holding: set[tuple[str, str]] = set()
        self._holding_lock = threading.Lock()

    def needs_full(self, tenant: str, job: JobSettings) -> bool:
        tables = job_tables(job)
        if tables.entity.log_time is not None:  # a log's table takes what each run reads; nothing to fill
            return False
        app = app_id(tenant, job.name)
        for spec in tables.all:
            for name in _names(spec):
                if self._holds(name, app):
                    continue
                table = self.open(name)
                if table is not None and table.transaction_version(app) is not None:
                    self._hold(name, app)
                else:
                    log.info(
                        "table %s holds no round of %s/%s yet: this round is a full one",
                        name,
                        tenant,
                        job.name,
                        extra={"tenant": tenant, "job": job.name},
                    )
                    return True
        return False

    def _holds(self, name: str, app: str) -> bool:
        with self._holding_lock:
            return (name, app) in self._holding

    def _hold(self, name: str, app: str, held: bool = True) -> None:
        with self._holding_lock:
            if held:
                self._holding.add((name, app))
            else:
                self._holding.discard((name, app))

    def apply(self, applied: AppliedRound) -> None:
        tables = job_tables(applied.job)
        wanted = {tables.entity.name: entity_rows(applied, tables.entity)}
        if tables.edges:
            wanted |= edge_rows(applied, tables.edges)
        commit = _Commit(applied.tenant, app_id(applied.tenant, applied.job.name), applied.started, applied.full)
        for spec in tables.all:
            self.retrying(spec.name, functools.partial(self._apply_current, spec, wanted[spec.name], commit))
            if spec.history:
                self.retrying(
                    spec.history_name, functools.partial(self._apply_history, spec, wanted[spec.name], commit)
                )

    def append(self, records: LogRecords) -> None:
        spec = job_tables(records.job).entity
        rows = log_rows(records.lines, spec)
        if rows:
            commit = _Commit(records.tenant, app_id(records.tenant, records.job.name), records.started)
            self.retrying(spec.name, functools.partial(self._append_absent, spec, rows, commit))

    def upkeep(self, names: Iterable[str], interrupted: Callable[[], bool]) -> dict[str, Any]:
        return maintain(self, names, interrupted)

    def open(self, name: str) -> DeltaTable | None:
        """The table as it is now, or ``None`` when there is none yet."""
        try:
            return DeltaTable(self.location.uri(name), storage_options=self.location.storage_options)
        except TableNotFoundError:
            return None

    # -- one table ---------------------------------------------------------------------------------------

    def _apply_current(self, spec: TableSpec, wanted: Wanted, commit: _Commit) -> None:
        if wanted.nothing:  # a delta round that names no row of the table (owners, when only members moved)
            return
        table = self._table(spec.name, _schema(spec), CURRENT_PROPERTIES)
        self._check(table, spec.name, commit)
        current = _read(table, spec, commit.tenant, current_only=False)
        upserts, deletes = _difference(wanted, current)
        if not upserts and not deletes:
            commit.mark(table, spec.name)
            return
        rows: list[SourceRow] = [(key, values, False) for key, values in upserts.items()]
        rows += [(key, None, True) for key in deletes]
        source = _source(spec, commit.tenant, rows, DELETED, ())
        keys = [*spec.keys]
        values = [column.name for column in spec.columns]
        before = _files(table)
        (
            table.merge(
                source,
                predicate=_match(commit.tenant, keys),
                source_alias="s",
                target_alias="t",
                commit_properties=commit.properties(),
            )
            .when_matched_delete(predicate=f"s.{DELETED}")
            .when_matched_update(updates=_assign(values), predicate=f"NOT s.{DELETED}")
            .when_not_matched_insert(updates=_assign([TENANT_ID, *keys, *values]), predicate=f"NOT s.{DELETED}")
            .execute()
        )
        commit.count(table, spec.name, before)

    def _apply_history(self, spec: TableSpec, wanted: Wanted, commit: _Commit) -> None:
        """Close the current rows that changed or went (``valid_to``, ``is_current``), open their successors."""
        if wanted.nothing:
            return
        table = self._table(spec.history_name, _schema(spec, history=True), CHECKPOINT_PROPERTIES)
        self._check(table, spec.history_name, commit)
        current = _read(table, spec, commit.tenant, current_only=True)
        upserts, deletes = _difference(wanted, current)
        if not upserts and not deletes:
            commit.mark(table, spec.history_name)
            return
        rows: list[SourceRow] = [
            (key, None, True) for key in itertools.chain(deletes, (k for k in upserts if k in current))
        ]
        rows += [(key, values, False) for key, values in upserts.items()]
        source = _source(spec, commit.tenant, rows, CLOSE, (commit.at, None, True))
        keys = [*spec.keys]
        columns = [TENANT_ID, *keys, *(column.name for column in spec.columns), VALID_FROM, VALID_TO, IS_CURRENT]
        before = _files(table)
        (
            table.merge(
                source,
                predicate=f"{_match(commit.tenant, keys)} AND t.{IS_CURRENT} AND s.{CLOSE}",
                source_alias="s",
                target_alias="t",
                commit_properties=commit.properties(),
            )
            .when_matched_update(updates={VALID_TO: f"s.{VALID_FROM}", IS_CURRENT: "false"})
            .when_not_matched_insert(updates=_assign(columns), predicate=f"NOT s.{CLOSE}")
            .execute()
        )
        commit.count(table, spec.history_name, before)

    def _append_absent(self, spec: TableSpec, rows: dict[Key, Values], commit: _Commit) -> None:
        """Append the rows whose id the tenant's partition lacks: a run that reads records again (the overlap, or a
        run repeated after a crash before its cursor was saved) adds nothing twice. Only rows at or after the
        earliest time among ``rows`` are read: a record keeps its time, so an older row cannot be one of them."""
        assert spec.log_time is not None
        table = self._table(spec.name, _schema(spec), CURRENT_PROPERTIES)
        commit.check(table, spec.name)
        at = [column.name for column in spec.columns].index(spec.log_time)
        times = [values[at] for values in rows.values() if values[at] is not None]
        filters: list[tuple[str, str, Any]] = [(TENANT_ID, "=", commit.tenant)]
        if times:
            filters.append((spec.log_time, ">=", min(times)))
        present = set(table.to_pyarrow_table(columns=[ID], filters=filters).column(ID).to_pylist())
        new: list[SourceRow] = [(key, values, False) for key, values in rows.items() if key[0] not in present]
        if not new:
            commit.mark(table, spec.name)
            return
        data = _source(spec, commit.tenant, new, None, ())
        before = _files(table)
        write_deltalake(table, data, mode="append", commit_properties=commit.properties())
        commit.count(table, spec.name, before)

    def _check(self, table: DeltaTable, name: str, commit: _Commit) -> None:
        """Refuse a round older than the one the table holds, and a delta round into a table that holds no round of
        its job (it would hold only the rows the round names); remember a table that holds one."""
        commit.check(table, name)
        if commit.full or table.transaction_version(commit.app) is not None:
            self._hold(name, commit.app)
            return
        self._hold(name, commit.app, held=False)
        raise TableNeedsFullRound(
            f"table {name} holds no round of {commit.app}: it was created or deleted since the job last ran; "
            "this delta round wrote nothing to it, a full round fills it"
        )

    def _table(self, name: str, schema: pa.Schema, properties: dict[str, str]) -> DeltaTable:
        """The table, created if missing, with every column of ``schema`` (added if missing: no data rewritten)."""
        table = self.open(name)
        if table is None:
            log.info("creating table %s under %s", name, self.location.describe())
            table = DeltaTable.create(
                self.location.uri(name),
                schema,
                partition_by=[TENANT_ID],
                configuration=properties,
                storage_options=self.location.storage_options,
                mode="ignore",  # another replica may create it at the same time
            )
        existing = {field.name: field for field in table.schema().fields}
        missing = [field for field in schema if field.name not in existing]
        if missing:
            # A Metadata action: concurrent writers of this table fail once and retry (see _retrying).
            log.info("table %s: adding columns %s", name, ", ".join(field.name for field in missing))
            table.alter.add_columns([Field.from_arrow(field) for field in missing])
        return table

    def retrying(self, name: str, step: Callable[[], None]) -> None:
        """Run ``step`` (read, compare, commit) again, from a fresh read, while it meets concurrent commits."""
        deadline = time.monotonic() + self._conflict_seconds
        for attempt in itertools.count():
            try:
                step()
                return
            except (CommitFailedError, DeltaError, OSError) as exc:
                if not _conflict(exc) or time.monotonic() > deadline:
                    raise
                TABLE_CONFLICTS_RETRIED.labels(name).inc()
                log.info("table %s: concurrent commit (%s); trying again", name, _first_line(exc))
                time.sleep(random.uniform(0, min(BACKOFF_CAP_SECONDS, self._backoff * 2**attempt)))


class _Commit:
    """What every commit of one round shares: its tenant, app transaction and time."""

    def __init__(self, tenant: str, app: str, started: float, full: bool = True) -> None:
        self.tenant = tenant
        self.app = app
        self.full = full  # a full round may fill a table that holds none of its job yet
        self.version = int(started * 1_000_000)
        self.at = datetime.fromtimestamp(started, UTC)

    def properties(self) -> CommitProperties:
        return CommitProperties(app_transactions=[Transaction(self.app, self.version)])

    def check(self, table: DeltaTable, name: str) -> None:
        recorded = table.transaction_version(self.app)
        if recorded is not None and recorded > self.version:
            raise StaleRound(
                f"table {name} already holds a newer round of {self.app} than this run's: this run wrote nothing "
                "to it (did this replica lose its job lock while stalled?)"
            )

    def mark(self, table: DeltaTable, name: str) -> None:
        """Record the round in a table it did not change, only where the table has none of this job yet (so that
        ``needs_full`` stops asking for full rounds): a round without changes commits nothing otherwise."""
        if table.transaction_version(self.app) is not None:
            return
        empty = pa.Table.from_batches([], schema=pa.schema(table.schema().to_arrow()))
        write_deltalake(table, empty, mode="append", commit_properties=self.properties())
        TABLE_COMMITS.labels(name).inc()

    def count(self, table: DeltaTable, name: str, before: set[str]) -> None:
        TABLE_COMMITS.labels(name).inc()
        added = _file_sizes(table)
        TABLE_BYTES_WRITTEN.labels(name).inc(sum(size for path, size in added.items() if path not in before))


def _names(spec: TableSpec) -> tuple[str, ...]:
    return (spec.name, spec.history_name) if spec.history else (spec.name,)


def _schema(spec: TableSpec, *, history: bool = False) -> pa.Schema:
    fields = [pa.field(TENANT_ID, pa.string()), *(pa.field(key, pa.string()) for key in spec.keys)]
    fields += [pa.field(column.name, ARROW_TYPES[column.kind]) for column in spec.columns]
    return pa.schema([*fields, *(HISTORY_COLUMNS if history else ())])


def _read(table: DeltaTable, spec: TableSpec, tenant: str, *, current_only: bool) -> dict[Key, Values]:
    """The tenant's rows (only the current ones of a history table): key -> the spec's values."""
    filters: list[tuple[str, str, Any]] = [(TENANT_ID, "=", tenant)]
    if current_only:
        filters.append((IS_CURRENT, "=", True))
    names = [*spec.keys, *(column.name for column in spec.columns)]
    data = table.to_pyarrow_table(columns=names, filters=filters)
    columns = [data.column(name).to_pylist() for name in names]
    width = len(spec.keys)
    return {tuple(row[:width]): tuple(row[width:]) for row in zip(*columns, strict=True)}


def _difference(wanted: Wanted, current: dict[Key, Values]) -> tuple[dict[Key, Values], list[Key]]:
    """The rows to write (new or different) and the keys to delete (in scope, present, not wanted)."""
    upserts = {key: values for key, values in wanted.rows.items() if current.get(key) != values}
    deletes = sorted(key for key in current if key not in wanted.rows and wanted.in_scope(key))
    return upserts, deletes


def _source(spec: TableSpec, tenant: str, rows: list[SourceRow], flag: str | None, extra: tuple[Any, ...]) -> pa.Table:
    """The MERGE's source: one row per (key, values or None, flag), with ``extra`` history values appended; without
    ``flag``, the table's own columns (an append)."""
    empty = (None,) * len(spec.columns)
    marked = () if flag is None else (pa.field(flag, pa.bool_()),)
    full_rows = [
        (tenant, *key, *(values or empty), *(extra if extra else ()), *((marker,) if marked else ()))
        for key, values, marker in rows
    ]
    fields = [*list(_schema(spec, history=bool(extra))), *marked]
    columns = list(zip(*full_rows, strict=True)) if full_rows else [() for _ in fields]
    return pa.table(
        [pa.array(column, field.type) for column, field in zip(columns, fields, strict=True)], pa.schema(fields)
    )


def _match(tenant: str, keys: Iterable[str]) -> str:
    """The MERGE predicate: the tenant's partition as a literal (the conflict checker then sees only it read), and
    the key."""
    literal = tenant.replace("'", "''")
    return " AND ".join([f"t.{TENANT_ID} = '{literal}'", *(f't."{key}" = s."{key}"' for key in keys)])


def _assign(columns: Iterable[str]) -> dict[str, str]:
    """``{target column: source column}``, quoted: DataFusion folds unquoted names to lower case."""
    return {f'"{name}"': f's."{name}"' for name in columns}


def _files(table: DeltaTable) -> set[str]:
    return set(_file_sizes(table))


def _file_sizes(table: DeltaTable) -> dict[str, int]:
    actions = pa.table(table.get_add_actions(flatten=True))
    return dict(zip(actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist(), strict=True))


def _conflict(exc: BaseException) -> bool:
    """A concurrent commit: delta-rs's conflict checker, or Azure's 412 that object_store does not map (#3166)."""
    if isinstance(exc, CommitFailedError):
        return True
    text = str(exc).lower()
    return any(
        sign in text for sign in ("412", "conditionnotmet", "precondition", "already exists", "metadata changed")
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
