"""Delta Lake tables beside the JSONL exports, brought up to date by every round (``[output] tables = true``).

A round sees only :class:`RoundTables`, as it sees only ``Sink`` for the JSONL: :meth:`RoundTables.apply` takes
what the round received (its change lines) and what it left in the working store, after the snapshot and the
change file are written and before the caller saves the delta link. A failure there fails the run, so the next run
fetches the same changes again from the same link; the tables then take in only what they lack (see
:mod:`graphsync.tables.delta`), so a crash between a table commit and ``state.json`` loses and duplicates nothing.

``deltalake`` and ``pyarrow`` are imported by :mod:`graphsync.tables.delta` only, which :func:`tables_from_settings`
imports only when tables are on: a command line without tables never loads them.

Modules: ``layout`` (which tables a job feeds, their columns and types), ``location`` (where a table lives and
the storage options delta-rs needs), ``rows`` (the rows a round wants, from the store and the change lines),
``delta`` (the delta-rs writer: diff, MERGE, history, retries), ``inspect`` (``status`` and ``check``: the log read
alone, a write probe), ``upkeep`` (compaction, vacuum, checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

from graphsync.snapshot import SnapshotStore

if TYPE_CHECKING:
    from graphsync.config import JobSettings, Settings


@dataclass(frozen=True)
class AppliedRound:
    """What one round received and left in the working store: what the tables take in."""

    tenant: str
    job: JobSettings
    full: bool  # a full round: the tenant's rows are replaced by the store's
    # ids the round's records named (a delta round: the only rows that can change); None when the round did not
    # keep them (too many to hold: graphsync.rounds.MAX_TOUCHED), then they are read from ``changes``
    touched: Collection[str] | None
    store: SnapshotStore  # the working store after the round, equal to the published snapshot
    changes: IO[bytes]  # the round's change lines, as in its change file, read from the start
    started: float  # Unix time the round started: its rows' valid_from, and its version in the tables


@dataclass(frozen=True)
class LogRecords:
    """The records a log run (sign-ins, audits) wrote to its change file: what its append-only table takes in."""

    tenant: str
    job: JobSettings
    lines: IO[bytes]  # the change file's lines, read from the start
    started: float  # Unix time the run started: its version in the table


class TableNeedsFullRound(Exception):
    """A delta round met a table that holds no round of its (tenant, job): created, or deleted and re-created, since
    the job's last run. The round wrote nothing to it; only a full round can fill it."""


class RoundTables(Protocol):
    """What a round needs from the tables, whichever the implementation (none, or Delta Lake)."""

    enabled: bool  # whether rounds write tables at all: a job's state records that its tables hold its rounds

    def needs_full(self, tenant: str, job: JobSettings) -> bool:
        """Whether a table of the job has never taken in a round of ``tenant`` (new, or deleted by an operator):
        only a full round can fill it, since a delta round names only what changed."""
        ...

    def apply(self, applied: AppliedRound) -> None:
        """Bring every table of the job up to date with the round, for its tenant; raise if that fails."""
        ...

    def append(self, records: LogRecords) -> None:
        """Add to the log's table the records it does not hold yet (by id), for their tenant; raise if that fails."""
        ...

    def upkeep(self, names: Iterable[str], interrupted: Callable[[], bool]) -> dict[str, Any]:
        """Compact, vacuum and checkpoint the tables ``names`` (:mod:`graphsync.tables.upkeep`); what was done."""
        ...


class NoTables:
    """Tables off: nothing to do."""

    enabled = False

    def needs_full(self, tenant: str, job: JobSettings) -> bool:
        return False

    def apply(self, applied: AppliedRound) -> None:
        return None

    def append(self, records: LogRecords) -> None:
        return None

    def upkeep(self, names: Iterable[str], interrupted: Callable[[], bool]) -> dict[str, Any]:
        return {}


NO_TABLES = NoTables()


def tables_from_settings(settings: Settings) -> RoundTables:
    """The tables ``[output] tables`` asks for; imports deltalake only when it is on."""
    if not settings.output.tables:
        return NO_TABLES
    from graphsync.tables.delta import DeltaTables  # deltalake and pyarrow: loaded only here
    from graphsync.tables.location import table_location

    return DeltaTables(table_location(settings))


def table_names(settings: Settings) -> list[str]:
    """Every table the configured jobs feed (history tables too), in job order."""
    from graphsync.tables.layout import job_tables

    names: dict[str, None] = {}
    for job in settings.jobs:
        for spec in job_tables(job).all:
            names |= dict.fromkeys((spec.name, spec.history_name) if spec.history else (spec.name,))
    return list(names)


def tables_status(settings: Settings) -> dict[str, Any] | None:
    """What ``status`` shows of the tables (:func:`graphsync.tables.inspect.describe`); ``None`` with tables off."""
    if not settings.output.tables:
        return None
    from graphsync.tables.inspect import describe
    from graphsync.tables.location import table_location

    location = table_location(settings)
    return {"root": location.describe(), "tables": describe(location, table_names(settings))}


def probe_tables(settings: Settings, replica: str) -> str:
    """Write and delete a probe table under the tables' root (raises if that fails); returns the root."""
    from graphsync.tables.inspect import probe
    from graphsync.tables.location import table_location

    location = table_location(settings)
    probe(location, replica)
    return location.describe()
