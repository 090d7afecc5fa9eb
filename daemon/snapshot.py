"""A collection's state during a run, kept in an on-disk SQLite file so memory stays flat in its size.

This is where Graph's delta semantics live: an updated object may carry only some properties (absent means
unchanged, ``null`` means cleared), the same object may come several times in a round (later wins), ``@removed``
takes it out, and a group's ``members@delta`` entries add or remove member ids, possibly spread over several
records. The snapshot comes out one JSON line per object, sorted by id.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MEMBERS_DELTA = "members@delta"


def _dumps(obj: dict[str, Any]) -> str:
    """Compact with sorted keys, so equal objects are equal text (and the store holds what the snapshot prints)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def encode(obj: dict[str, Any]) -> bytes:
    """One JSON line."""
    return _dumps(obj).encode() + b"\n"


def merge_record(stored: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any]:
    """Apply one delta record (not a removal) to the stored object; never replaces it by a partial one."""
    merged = dict(stored) if stored else {}
    for key, value in record.items():
        if key == MEMBERS_DELTA:
            merged["members"] = _apply_members(merged.get("members") or [], value or [])
        else:
            merged[key] = value
    return merged


def _apply_members(current: list[str], changes: list[dict[str, Any]]) -> list[str]:
    members = set(current)
    for change in changes:
        if "@removed" in change:
            members.discard(change["id"])
        else:
            members.add(change["id"])
    return sorted(members)


class SnapshotStore:
    """The objects of one (tenant, job) keyed by id, in a throwaway SQLite file owned by one run."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # A scratch file: durability comes from the sink's atomic replace, not from SQLite's journal.
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE objects (id TEXT PRIMARY KEY, body TEXT NOT NULL)")

    def load(self, lines: Iterable[bytes]) -> None:
        """Fill the store from an existing snapshot (one JSON object per line)."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO objects (id, body) VALUES (?, ?)",
                ((obj["id"], _dumps(obj)) for obj in map(json.loads, filter(bytes.strip, lines))),
            )
        except BaseException:
            self._db.execute("ROLLBACK")  # leave the store usable: the caller falls back to a full sync
            raise
        self._db.execute("COMMIT")

    def apply(self, records: Iterable[dict[str, Any]]) -> None:
        """Apply a page of records in one transaction."""
        self._db.execute("BEGIN")
        try:
            for record in records:
                object_id = record["id"]
                if "@removed" in record:
                    self._db.execute("DELETE FROM objects WHERE id = ?", (object_id,))
                    continue
                row = self._db.execute("SELECT body FROM objects WHERE id = ?", (object_id,)).fetchone()
                merged = merge_record(json.loads(row[0]) if row else None, record)
                self._db.execute("INSERT OR REPLACE INTO objects (id, body) VALUES (?, ?)",
                                 (object_id, _dumps(merged)))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def clear(self) -> None:
        self._db.execute("DELETE FROM objects")

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM objects").fetchone()[0]

    def lines(self) -> Iterator[bytes]:
        """The snapshot, sorted by id (SQLite compares TEXT bytewise: UTF-8 order is code-point order)."""
        for (body,) in self._db.execute("SELECT body FROM objects ORDER BY id"):
            yield body.encode() + b"\n"

    def close(self) -> None:
        self._db.close()
