"""Bounded upkeep of the tables: compaction per tenant partition, vacuum, checkpoint and log cleanup.

Run once per slot fleet-wide (:mod:`graphsync.upkeep` takes the lease); rounds never wait for it. For each table:

1. **compact** each tenant partition that holds more than one data file (every MERGE adds files and copy-on-write
   leaves rewritten ones behind): ``optimize.compact(partition_filters=[tenant_id = t])``, one commit per
   partition. Compaction conflicts with a concurrent MERGE of the same tenant (it removes the files that MERGE
   read): the loser retries from a fresh read, as rounds do (:meth:`DeltaTables.retrying`). Other tenants' rounds
   touch other partitions and do not conflict.
2. **vacuum** with Delta's own retention (``delta.deletedFileRetentionDuration``, 7 days by default) and its
   enforcement on: a file is deleted only once it has been out of the table for that long, so a reader still on
   an older version (a Spark job, a CDF consumer) keeps its files. Never less: graphsync does not pass a retention.
   A *full* vacuum (it lists the table's files): a MERGE that lost a commit race leaves the data files it wrote
   behind, referenced by no version; only a full vacuum finds those (once they are as old as the retention).
3. **checkpoint** the latest version and **clean the log** of entries older than ``delta.logRetentionDuration``
   (30 days) that a checkpoint covers: readers then load one Parquet checkpoint plus the commits after it, and the
   log does not grow for ever. (delta-rs also checkpoints every ``delta.checkpointInterval`` = 100 commits.)

Stops between partitions and tables once ``interrupted()`` says so (a shutdown, or the lease lost).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from deltalake import DeltaTable

from graphsync.tables.layout import TENANT_ID

if TYPE_CHECKING:
    from graphsync.tables.delta import DeltaTables

log = logging.getLogger(__name__)


def maintain(tables: DeltaTables, names: Iterable[str], interrupted: Callable[[], bool]) -> dict[str, Any]:
    """Compact, vacuum and checkpoint each table; returns what was done, per table."""
    done: dict[str, Any] = {}
    for name in names:
        if interrupted():
            break
        table = tables.open(name)
        if table is None:
            continue
        actions = pa.table(table.get_add_actions(flatten=True))
        files = Counter(actions.column(f"partition.{TENANT_ID}").to_pylist())
        compacted: dict[str, int] = {}
        for tenant in sorted(tenant for tenant, count in files.items() if count > 1):
            if interrupted():
                break
            tables.retrying(name, functools.partial(_compact, tables, name, tenant, compacted))
        vacuumed: list[str] = []
        if not interrupted():
            tables.retrying(name, functools.partial(_vacuum_and_checkpoint, tables, name, vacuumed))
        done[name] = {
            "partitions_compacted": len(compacted),
            "files_compacted": sum(compacted.values()),
            "files_vacuumed": len(vacuumed),
        }
        log.info("table %s: %s; checkpointed", name, done[name])
    return done


def _open(tables: DeltaTables, name: str) -> DeltaTable:
    table = tables.open(name)
    if table is None:
        raise FileNotFoundError(f"table {name} is gone (deleted by an operator?)")
    return table


def _compact(tables: DeltaTables, name: str, tenant: str, compacted: dict[str, int]) -> None:
    """One tenant's partition into as few files as the target size allows (from a fresh read: a retry's too)."""
    metrics = _open(tables, name).optimize.compact(partition_filters=[(TENANT_ID, "=", tenant)])
    compacted[tenant] = int(metrics.get("numFilesRemoved", 0))


def _vacuum_and_checkpoint(tables: DeltaTables, name: str, vacuumed: list[str]) -> None:
    vacuumed[:] = _open(tables, name).vacuum(dry_run=False, enforce_retention_duration=True, full=True)
    table = _open(tables, name)
    table.create_checkpoint()
    table.cleanup_metadata()
