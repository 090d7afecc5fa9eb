"""A collection's state in an on-disk SQLite file, so memory stays flat in its size, kept between runs.

This is where Graph's delta semantics live: an updated object may carry only some properties (absent means
unchanged, ``null`` means cleared), the same object may come several times in a round (later wins), ``@removed``
takes it out, and a group's ``members@delta`` entries add or remove member ids, possibly spread over several
records. A group's ``owners@delta`` (``owners`` in its ``$select``) works the same way. A user's ``manager@delta``
(a job that expands the manager) becomes ``manager``: the manager's id, or ``null`` once removed. Members and owners
live in tables of their own, so a change to a group of any size costs only its changed links. The snapshot comes out
one JSON line per object, sorted by id, groups with sorted ``members`` (and ``owners``) lists.

The store also remembers which published snapshot it equals (its *tag*) and the chunks that snapshot is made of
(:mod:`graphsync.chunking`), so the next run can start from it without downloading anything. SQLite's rollback
journal makes every transaction atomic across a crash: a run's changes and the tag of the version it published
commit together, or not at all.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphsync.chunking import ChunkRef
from graphsync.jsoncodec import dumps, loads

MEMBERS_DELTA = "members@delta"
MEMBERS = "members"
MANAGER_DELTA = "manager@delta"
MANAGER = "manager"
OWNERS_DELTA = "owners@delta"
OWNERS = "owners"


@dataclass(frozen=True)
class _ListLink:
    """A many-valued link: its snapshot property, its record annotation, its SQLite table, and its bit in
    ``objects.has_members`` (a bit mask: which lists the object carries; stores from before owners hold 0 or 1)."""

    name: str
    delta: str
    table: str
    bit: int


_LIST_LINKS = (_ListLink(MEMBERS, MEMBERS_DELTA, "members", 1), _ListLink(OWNERS, OWNERS_DELTA, "owners", 2))

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS objects (id TEXT PRIMARY KEY, body TEXT NOT NULL, has_members INTEGER)",
    "CREATE TABLE IF NOT EXISTS members (object_id TEXT, member_id TEXT, PRIMARY KEY (object_id, member_id))"
    " WITHOUT ROWID",
    # member_id: the owner's id (one column name for both link tables, so one statement serves both)
    "CREATE TABLE IF NOT EXISTS owners (object_id TEXT, member_id TEXT, PRIMARY KEY (object_id, member_id))"
    " WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS chunks (position INTEGER PRIMARY KEY, block_id TEXT NOT NULL, first_id TEXT NOT NULL,"
    " last_id TEXT NOT NULL, count INTEGER NOT NULL, size INTEGER NOT NULL)",
)


_LINKS = frozenset({MEMBERS_DELTA, MANAGER_DELTA, OWNERS_DELTA})


def _manager(entries: list[dict[str, Any]]) -> str | None:
    """The manager's id after a ``manager@delta``: its last entry that is not ``@removed``, else none."""
    current = [entry["id"] for entry in entries if "@removed" not in entry]
    return current[-1] if current else None


def encode(obj: dict[str, Any]) -> bytes:
    """One JSON line: compact with sorted keys, so equal objects are equal text (and the store holds what the
    snapshot prints); :mod:`graphsync.jsoncodec` keeps it the standard library's text."""
    return dumps(obj) + b"\n"


# A page's writes, in two ordered streams: the objects (one statement per record) and the links (members, owners).
_UPSERT = (
    "INSERT INTO objects (id, body, has_members) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE"
    " SET body = graphsync_merge(body, ?), has_members = coalesce(has_members, 0) | excluded.has_members"
)
_DELETE = "DELETE FROM objects WHERE id = ?"
_DROP_LINKS = {link: f"DELETE FROM {link.table} WHERE object_id = ?" for link in _LIST_LINKS}
_ADD_LINK = {link: f"INSERT OR IGNORE INTO {link.table} VALUES (?, ?)" for link in _LIST_LINKS}
_REMOVE_LINK = {link: f"DELETE FROM {link.table} WHERE object_id = ? AND member_id = ?" for link in _LIST_LINKS}

Writes = list[tuple[str, tuple[Any, ...]]]  # (statement, arguments), in record order


def _merge(stored: str, patch: str) -> str:
    """``graphsync_merge(body, patch)`` in SQL: what a record (``patch``, without its links) makes of a stored
    object. Absent properties stay, ``null`` clears, others replace: Graph's delta semantics."""
    obj = loads(stored)
    obj.update(loads(patch))
    return dumps(obj).decode()


def _page_writes(
    records: Iterable[dict[str, Any]], lines: Sequence[bytes] | None, defaults: Mapping[str, Any]
) -> tuple[Writes, Writes]:
    """The statements that apply ``records`` in order: an upsert (a new object is ``defaults`` and its record; a
    stored one merges the record in, :func:`_merge`) or a delete per record, and the link changes."""
    objects: Writes = []
    links: Writes = []
    for index, record in enumerate(records):
        object_id = record["id"]
        if "@removed" in record:
            objects.append((_DELETE, (object_id,)))
            links.extend((_DROP_LINKS[link], (object_id,)) for link in _LIST_LINKS)
            continue
        carried = [link for link in _LIST_LINKS if link.delta in record]
        if lines is not None and not carried and MANAGER_DELTA not in record:
            patch_obj, patch = record, lines[index][:-1].decode()  # the record is its own patch: its change line
        else:
            patch_obj = {key: value for key, value in record.items() if key not in _LINKS}
            if MANAGER_DELTA in record:
                patch_obj[MANAGER] = _manager(record[MANAGER_DELTA])
            patch = dumps(patch_obj).decode()
        new = (
            patch if not defaults or defaults.keys() <= patch_obj.keys() else dumps({**defaults, **patch_obj}).decode()
        )
        objects.append((_UPSERT, (object_id, new, sum(link.bit for link in carried), patch)))
        for link in carried:
            for change in record[link.delta]:
                statement = _REMOVE_LINK[link] if "@removed" in change else _ADD_LINK[link]
                links.append((statement, (object_id, change["id"])))
    return objects, links


@dataclass(frozen=True)
class StoreTag:
    """Which published snapshot the store equals: its version, the query it answers and its chunking level."""

    version: str
    query: str
    level: int


class SnapshotStore:
    """The objects of one (tenant, job) keyed by id, in a SQLite file on this host's disk.

    ``objects.body`` holds an object without its members and owners; ``has_members`` says which of those lists
    the object carries (a bit each, see :class:`_ListLink`: an object carries one once any of its ``<link>@delta``
    arrived, even an empty one). ``meta`` holds the
    tag, ``chunks`` the published snapshot's chunks in order.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.create_function("graphsync_merge", 2, _merge, deterministic=True)
        try:
            for statement in _SCHEMA:
                self._db.execute(statement)
        except BaseException:
            self._db.close()
            raise

    # -- transactions: every write below runs inside the caller's transaction, or is one by itself --------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing, across a crash too: a SIGKILL before the commit leaves the store as it was."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        """A savepoint: its own transaction outside :meth:`transaction`, a nested one inside it."""
        self._db.execute("SAVEPOINT step")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO step")
            self._db.execute("RELEASE step")
            raise
        self._db.execute("RELEASE step")

    # -- contents ------------------------------------------------------------------------------------------

    def load(self, lines: Iterable[bytes]) -> None:
        """Add the objects of snapshot lines (one JSON object per line); all of them or, on a bad line, none."""
        with self._step():
            for obj in map(loads, filter(bytes.strip, lines)):
                lists = {link: obj.pop(link.name) for link in _LIST_LINKS if isinstance(obj.get(link.name), list)}
                self._put(obj, lists=sum(link.bit for link in lists))
                for link, ids in lists.items():
                    self._db.executemany(_ADD_LINK[link], ((obj["id"], linked) for linked in ids))

    def apply(
        self,
        records: Iterable[dict[str, Any]],
        *,
        defaults: Mapping[str, Any] | None = None,
        lines: Sequence[bytes] | None = None,
    ) -> None:
        """Apply a page of records atomically; never replaces a stored object by a partial one.

        ``defaults``: what an object the store does not hold yet starts with, for properties its record may lack
        (a user without a manager carries no ``manager@delta`` at all, yet its line must say ``"manager": null``
        whether it came in a full round or a delta round). ``lines``: the records' change-file lines (:func:`encode`
        of each), reused as the stored text of a record that needs no change: serialized once, not twice.

        A page costs a few ``executemany`` calls, not a few statements per record: each record is one upsert (or
        delete), whose conflict merges it into the stored object in SQL (``graphsync_merge``), so a new object is
        never looked up first. Objects and links are separate tables, so their two streams of writes each keep
        the records' order without interleaving.
        """
        objects, links = _page_writes(records, lines, defaults or {})
        with self._step():
            for writes in (objects, links):
                for statement, group in itertools.groupby(writes, key=lambda write: write[0]):
                    self._db.executemany(statement, (arguments for _, arguments in group))

    def _put(self, obj: dict[str, Any], *, lists: int) -> None:
        """Store ``obj``; ``lists``: the bits of the link lists it carries (see :class:`_ListLink`)."""
        self._db.execute(
            "INSERT OR REPLACE INTO objects (id, body, has_members) VALUES (?, ?, ?)",
            (obj["id"], dumps(obj).decode(), lists),
        )

    def clear(self) -> None:
        """Forget everything, the tag and the chunks too."""
        with self._step():
            for table in ("objects", *(link.table for link in _LIST_LINKS), "meta", "chunks"):
                self._db.execute(f"DELETE FROM {table}")

    def drop_range(self, first_id: str, last_id: str) -> None:
        """Remove the objects with ids in ``[first_id, last_id]``: a published chunk that is gone."""
        with self._step():
            self._db.execute("DELETE FROM objects WHERE id BETWEEN ? AND ?", (first_id, last_id))
            for link in _LIST_LINKS:
                self._db.execute(f"DELETE FROM {link.table} WHERE object_id BETWEEN ? AND ?", (first_id, last_id))

    def count(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM objects").fetchone()
        return int(count)

    def entries(self, first_id: str | None = None, last_id: str | None = None) -> Iterator[tuple[str, bytes]]:
        """``(id, line)`` of the snapshot, sorted by id: all of it, or the ids in ``[first_id, last_id]`` (either
        end may be open).

        SQLite compares TEXT bytewise, and UTF-8 byte order is code-point order: the same order as Python's.
        """
        bounds = [("id >= ?", first_id), ("id <= ?", last_id)]
        yield from self._entries([(test, value) for test, value in bounds if value is not None])

    def entries_after(self, after_id: str | None) -> Iterator[tuple[str, bytes]]:
        """``(id, line)`` of the objects after ``after_id`` (all of them for ``None``), sorted by id."""
        yield from self._entries([] if after_id is None else [("id > ?", after_id)])

    def _entries(self, bounds: list[tuple[str, str]]) -> Iterator[tuple[str, bytes]]:
        where = f"WHERE {' AND '.join(test for test, _ in bounds)}" if bounds else ""
        rows = self._db.execute(
            f"SELECT id, body, has_members FROM objects {where} ORDER BY id", [value for _, value in bounds]
        )
        linked = self._db.cursor()
        for object_id, body, lists in rows:
            if not lists:
                yield object_id, body.encode() + b"\n"
                continue
            obj = loads(body)
            for link in _LIST_LINKS:
                if lists & link.bit:
                    query = f"SELECT member_id FROM {link.table} WHERE object_id = ? ORDER BY member_id"
                    obj[link.name] = [m for (m,) in linked.execute(query, (object_id,))]
            yield object_id, encode(obj)

    def lines(self) -> Iterator[bytes]:
        """The snapshot, one JSON line per object, sorted by id."""
        for _, line in self.entries():
            yield line

    # -- which published snapshot this is ------------------------------------------------------------------

    @property
    def tag(self) -> StoreTag | None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not {"version", "query", "level"} <= meta.keys():
            return None
        return StoreTag(meta["version"], meta["query"], int(meta["level"]))

    def set_tag(self, tag: StoreTag | None, chunks: Iterable[ChunkRef] = ()) -> None:
        """Say which published snapshot the store now equals and its chunks (``None``: it equals none)."""
        with self._step():
            self._db.execute("DELETE FROM meta")
            self._db.execute("DELETE FROM chunks")
            if tag is None:
                return
            self._db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                (("version", tag.version), ("query", tag.query), ("level", str(tag.level))),
            )
            self._db.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                ((n, c.block_id, c.first_id, c.last_id, c.count, c.size) for n, c in enumerate(chunks)),
            )

    def chunks(self) -> list[ChunkRef]:
        rows = self._db.execute("SELECT block_id, first_id, last_id, count, size FROM chunks ORDER BY position")
        return [ChunkRef(*row) for row in rows]

    def check(self) -> None:
        """Raise :class:`sqlite3.DatabaseError` unless the file is sound and its objects match its chunks.

        ``quick_check`` reads every page once (a truncated or overwritten file fails it); the count check
        catches a store whose objects and chunk list disagree.
        """
        (result,) = self._db.execute("PRAGMA quick_check").fetchone()
        if result != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {result}")
        chunks = self._db.execute("SELECT COUNT(*), COALESCE(SUM(count), 0) FROM chunks").fetchone()
        if chunks[0] and chunks[1] != self.count():
            raise sqlite3.DatabaseError(f"{self.count()} objects but the chunks hold {chunks[1]}")

    def close(self) -> None:
        self._db.close()
