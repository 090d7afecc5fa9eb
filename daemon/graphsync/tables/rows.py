"""The rows a round wants in each table of its tenant, and which of the table's rows it speaks for.

A collection's rows come from the working store, which already applied Graph's delta semantics (a partial record
updated only the properties it carried, ``null`` cleared one, ``@removed`` took the object out): for a delta round,
the rows of the ids its records named; for a full round, every row. The store keeps no member types, so
relationship rows come from the round's change lines, in order: a ``<link>@delta`` entry adds a row (with its
``@odata.type``) or, with ``@removed``, takes it out; a removed object takes out all its rows. A delta round speaks
only for the rows it names; a full round for all of the tenant's rows, so what it did not list goes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from graphsync.tables.layout import ID, MANAGER, MANAGER_ID, Column, TableSpec

if TYPE_CHECKING:
    from graphsync.tables import AppliedRound

Key = tuple[str, ...]
Values = tuple[Any, ...]
GRAPH_TYPE_PREFIX = "#microsoft.graph."


@dataclass(frozen=True)
class Wanted:
    """One table's rows as the round wants them (key after ``tenant_id`` -> values), and the rows of the table it
    decides: a row in scope that the round does not want goes; a row out of scope stays as it is."""

    rows: dict[Key, Values]
    in_scope: Callable[[Key], bool]
    nothing: bool = False  # the round speaks for no row of this table: it need not even be read


def everything(key: Key) -> bool:
    return True


def entity_rows(applied: AppliedRound, spec: TableSpec) -> Wanted:
    """The collection's rows: every object after a full round, else those the round's records named."""
    if applied.full:
        rows: dict[Key, Values] = {(oid,): _values(json.loads(line), spec) for oid, line in applied.store.entries()}
        return Wanted(rows, everything)
    touched = frozenset(applied.touched if applied.touched is not None else _named(applied.changes))
    entries = (entry for oid in touched for entry in applied.store.entries(oid, oid))
    wanted: dict[Key, Values] = {(oid,): _values(json.loads(line), spec) for oid, line in entries}
    return Wanted(wanted, lambda key: key[0] in touched)


def _named(changes: IO[bytes]) -> Iterator[str]:
    """The ids the round's change lines name, read from the start; the file is left at its start again."""
    changes.seek(0)
    try:
        for line in changes:
            if line.strip():
                yield json.loads(line)[ID]
    finally:
        changes.seek(0)


def log_rows(lines: IO[bytes], spec: TableSpec) -> dict[Key, Values]:
    """A log run's records as rows of its append-only table (a record read twice in the run is one row)."""
    return {(obj[ID],): _values(obj, spec) for obj in (json.loads(line) for line in lines if line.strip())}


def _values(obj: dict[str, Any], spec: TableSpec) -> Values:
    source = {**obj, MANAGER_ID: obj.get(MANAGER)}
    return tuple(
        convert(column, source.get(column.name), f"{spec.name}.{column.name} of {obj[ID]}") for column in spec.columns
    )


def edge_rows(applied: AppliedRound, specs: Iterable[TableSpec]) -> dict[str, Wanted]:
    """Each relationship table's rows, from one pass over the round's change lines."""
    specs = list(specs)
    links: dict[str, dict[str, dict[str, str | None]]] = {spec.name: {} for spec in specs}  # source -> target -> type
    removed: set[str] = set()
    for line in applied.changes:
        if not line.strip():
            continue
        record = json.loads(line)
        source = record[ID]
        if "@removed" in record:
            removed.add(source)
            for table in links.values():
                table.pop(source, None)
            continue
        for spec in specs:
            for entry in record.get(f"{spec.link}@delta", ()):
                kind = None if "@removed" in entry else _graph_type(entry)
                links[spec.name].setdefault(source, {})[entry[ID]] = kind
    return {spec.name: _wanted_edges(links[spec.name], removed, applied.full) for spec in specs}


def _wanted_edges(links: dict[str, dict[str, str | None]], removed: set[str], full: bool) -> Wanted:
    rows: dict[Key, Values] = {
        (source, target): (kind,) for source, targets in links.items() for target, kind in targets.items() if kind
    }
    if full:
        return Wanted(rows, everything)

    def in_scope(key: Key) -> bool:
        return key[0] in removed or key[1] in links.get(key[0], {})

    return Wanted(rows, in_scope, nothing=not links and not removed)


def _graph_type(entry: dict[str, Any]) -> str:
    """``#microsoft.graph.user`` -> ``user``: what a linked object is (user, group, servicePrincipal, device...)."""
    return str(entry.get("@odata.type") or "").removeprefix(GRAPH_TYPE_PREFIX) or "unknown"


def convert(column: Column, value: Any, where: str) -> Any:
    """A Graph JSON value as the column's type; ``where`` names the table, column and object in errors."""
    if value is None:
        return None
    kind = column.kind
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "integer" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "timestamp" and isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not an ISO-8601 time") from None
        # Graph's times carry a zone (Z); a bare one is UTC too. Always tz-aware: see layout's docstring.
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    if kind in ("json", "string"):  # a documented string that came as something else stays readable as JSON
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    raise ValueError(f"{where}: expected a {kind}, Graph sent {type(value).__name__}")
