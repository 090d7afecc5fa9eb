"""What ``status`` and ``check`` say of the tables: read from the Delta log alone, and a write probe.

A table's version, last commit and rows per tenant come from its log, never from its data files: delta-rs loads the
last checkpoint (``_delta_log/_last_checkpoint`` and one Parquet file) plus the JSON commits after it (fewer than
``delta.checkpointInterval``), and the add actions there carry each file's row count (``num_records``) and its
partition (``tenant_id``). So a table costs a handful of reads whatever its size; the last commit's time is the
newest ``commitInfo`` (one more read).
"""

from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError
from deltalake.fs import DeltaStorageHandler

from graphsync.tables.layout import TENANT_ID
from graphsync.tables.location import TableLocation

PROBES = "_graphsync_check"  # under the tables' root; never a table's name (table names have no leading '_')


def describe(location: TableLocation, names: Iterable[str]) -> list[dict[str, Any]]:
    """Each table's version, last commit (UTC, ISO 8601), data files and rows per tenant; a table not created yet
    has version ``None``, one that cannot be read says why in ``problem``."""
    report = []
    for name in names:
        entry: dict[str, Any] = {"table": name, "version": None, "last_commit": None, "files": 0, "rows": {}}
        try:
            table = DeltaTable(location.uri(name), storage_options=location.storage_options)
            actions = pa.table(table.get_add_actions(flatten=True))
            rows: Counter[str] = Counter()
            column = f"partition.{TENANT_ID}"
            for tenant, count in zip(
                actions.column(column).to_pylist(), actions.column("num_records").to_pylist(), strict=True
            ):
                rows[tenant] += count or 0
            [last] = table.history(1)
            entry |= {
                "version": table.version(),
                "last_commit": datetime.fromtimestamp(last["timestamp"] / 1000, UTC).isoformat(),
                "files": actions.num_rows,
                "rows": dict(sorted(rows.items())),
            }
        except TableNotFoundError:
            pass
        except (DeltaError, OSError, KeyError, ValueError) as exc:
            entry["problem"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        report.append(entry)
    return report


def probe(location: TableLocation, replica: str) -> None:
    """Write a one-row Delta table under the tables' root, as a round would (data file, then a create-only log
    entry), and delete it: raises what delta-rs raises when the location is not writable."""
    name = f"{PROBES}/{replica}"
    write_deltalake(
        location.uri(name),
        pa.table({"probe": ["graphsync check"]}),
        mode="overwrite",  # one left by an interrupted check
        storage_options=location.storage_options,
    )
    if location.local:  # delta-rs leaves a local directory's empty folders behind
        shutil.rmtree(Path(location.root) / name)
        with contextlib.suppress(OSError):  # another replica's probe is there
            (Path(location.root) / PROBES).rmdir()
    else:
        DeltaStorageHandler(location.root, location.storage_options).delete_dir(name)
