"""A collection's state during a run, kept in an on-disk SQLite file so memory stays flat in its size.

This is where Graph's delta semantics live: an updated object may carry only some properties (absent means
unchanged, ``null`` means cleared), the same object may come several times in a round (later wins), ``@removed``
takes it out, and a group's ``members@delta`` entries add or remove member ids, possibly spread over several
records. Members live in a table of their own, so a change to a group of any size costs only its changed
members. The snapshot comes out one JSON line per object, sorted by id, groups with a sorted ``members`` list.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MEMBERS_DELTA = "members@delta"
MEMBERS = "members"


def _dumps(obj: dict[str, Any]) -> str:
    """Compact with sorted keys, so equal objects are equal text (and the store holds what the snapshot prints)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def encode(obj: dict[str, Any]) -> bytes:
    """One JSON line."""
    return _dumps(obj).encode() + b"\n"


class SnapshotStore:
    """The objects of one (tenant, job) keyed by id, in a throwaway SQLite file owned by one run.

    ``objects.body`` holds an object without its members; ``has_members`` says whether the object carries a
    ``members`` list (it does once any ``members@delta`` arrived for it, even an empty one).
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # A scratch file: durability comes from the sink's atomic replace, not from SQLite's journal.
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE objects (id TEXT PRIMARY KEY, body TEXT NOT NULL, has_members INTEGER)")
        self._db.execute(
            "CREATE TABLE members (object_id TEXT, member_id TEXT, PRIMARY KEY (object_id, member_id)) WITHOUT ROWID"
        )

    def load(self, lines: Iterable[bytes]) -> None:
        """Fill the store from an existing snapshot (one JSON object per line)."""
        self._db.execute("BEGIN")
        try:
            for obj in map(json.loads, filter(bytes.strip, lines)):
                members = obj.pop(MEMBERS, None) if isinstance(obj.get(MEMBERS), list) else None
                self._put(obj, has_members=members is not None)
                if members:
                    self._db.executemany(
                        "INSERT OR IGNORE INTO members VALUES (?, ?)", ((obj["id"], member) for member in members)
                    )
        except BaseException:
            self._db.execute("ROLLBACK")  # leave the store usable: the caller falls back to a full sync
            raise
        self._db.execute("COMMIT")

    def apply(self, records: Iterable[dict[str, Any]]) -> None:
        """Apply a page of records in one transaction; never replaces a stored object by a partial one."""
        self._db.execute("BEGIN")
        try:
            for record in records:
                object_id = record["id"]
                if "@removed" in record:
                    self._db.execute("DELETE FROM objects WHERE id = ?", (object_id,))
                    self._db.execute("DELETE FROM members WHERE object_id = ?", (object_id,))
                    continue
                row = self._db.execute("SELECT body, has_members FROM objects WHERE id = ?", (object_id,)).fetchone()
                stored = json.loads(row[0]) if row else {}
                changes = record.get(MEMBERS_DELTA)
                stored.update((key, value) for key, value in record.items() if key != MEMBERS_DELTA)
                self._put(stored, has_members=bool(row and row[1]) or changes is not None)
                for change in changes or ():
                    if "@removed" in change:
                        self._db.execute(
                            "DELETE FROM members WHERE object_id = ? AND member_id = ?", (object_id, change["id"])
                        )
                    else:
                        self._db.execute("INSERT OR IGNORE INTO members VALUES (?, ?)", (object_id, change["id"]))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _put(self, obj: dict[str, Any], *, has_members: bool) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO objects (id, body, has_members) VALUES (?, ?, ?)",
            (obj["id"], _dumps(obj), int(has_members)),
        )

    def clear(self) -> None:
        self._db.execute("DELETE FROM objects")
        self._db.execute("DELETE FROM members")

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM objects").fetchone()[0]

    def lines(self) -> Iterator[bytes]:
        """The snapshot, sorted by id (SQLite compares TEXT bytewise: UTF-8 order is code-point order)."""
        members = self._db.cursor()
        for object_id, body, has_members in self._db.execute("SELECT id, body, has_members FROM objects ORDER BY id"):
            if not has_members:
                yield body.encode() + b"\n"
                continue
            obj = json.loads(body)
            obj[MEMBERS] = [
                m
                for (m,) in members.execute(
                    "SELECT member_id FROM members WHERE object_id = ? ORDER BY member_id", (object_id,)
                )
            ]
            yield encode(obj)

    def close(self) -> None:
        self._db.close()
