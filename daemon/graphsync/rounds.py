"""One round of one job: bring the working store up to date, fetch pages into it, publish what changed.

The order is what makes a round safe to interrupt anywhere:

1. the host's working store is made equal to the published snapshot (:func:`graphsync.publication.refresh`;
   nothing to do when it is warm), in a transaction of its own — or, on a host without a usable store, emptied to
   receive only the chunks the round touches (:mod:`graphsync.coldstore`);
2. pages go into the store inside one transaction and into a change file beside it;
3. the snapshot is published (fenced on the version the round started from), and the store is tagged with the
   new version, in that same transaction, which then commits;
4. the change file is written, and the round applied to the tables (:mod:`graphsync.tables`, when on).
   (The caller saves the cursor last.)

A failure or a kill before step 3's commit rolls the store back to the version it is tagged with; after it, the
store equals what was published. A round that received nothing publishes nothing and writes no change file.

A reconciling run (:mod:`graphsync.reconcile`) is two such rounds in a row: the delta round from the saved link,
then a full round compared with what the delta round left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from graphsync.coldstore import PartialSnapshot, prepare
from graphsync.config.jobkinds import SINGLETONS
from graphsync.graph import GraphClient, MalformedResponse, Page, ResyncRequired
from graphsync.prefetch import StoppedWaiting, read_ahead
from graphsync.publication import Publication, Published, Refreshed, publish
from graphsync.reconcile import Drift, compare, saved_lines
from graphsync.sinks import Sink
from graphsync.snapshot import MANAGER, MANAGER_DELTA, MEMBERS_DELTA, OWNERS_DELTA, SnapshotStore, encode
from graphsync.tables import NO_TABLES, AppliedRound, RoundTables, TableNeedsFullRound
from graphsync.workstore import WorkStores

if TYPE_CHECKING:
    from graphsync.config import JobSettings

log = logging.getLogger(__name__)

Progress = Callable[[str, str, int, int], None]
"""Called after every page with (tenant, job, pages so far, records so far)."""

MAX_TOUCHED = 10_000
"""A delta round that received more ids than this cuts the whole snapshot again instead of around each: by then
that costs about as much, and memory stays bounded whatever the round's size."""


class RunInterrupted(Exception):
    """The run stopped between pages (shutdown, or the lock was lost); nothing of the current round was published."""


@dataclass
class Round:
    """What a round did; filled in as it goes, so a progress display can read it too."""

    delta_link: str | None = None
    objects: int = 0
    changes: int = 0
    pages: int = 0
    full: bool = False
    resync: bool = False
    refreshed: Refreshed | None = None
    publication: Publication | None = None
    drift: Drift | None = None  # set by a reconciling round: how far the published snapshot was from it
    # Ids of the records a delta round received, where the chunks may change; None: the whole snapshot may.
    touched: set[str] | None = field(default_factory=set)

    def touch(self, ids: Iterable[str]) -> None:
        """Note ``ids`` as received; a full round cuts everything anyway and keeps none (memory stays flat)."""
        if self.full or self.touched is None:
            return
        self.touched.update(ids)
        if len(self.touched) > MAX_TOUCHED:
            self.touched = None

    tables: bool = False  # the round is in the tables (with tables on): state.json records it, see TABLES_HELD
    refill: bool = False  # a delta round met a table without the job's rounds: a full round must follow at once


# state.json's record that the job's tables hold its rounds: runs then skip needs_full, which opens every table of
# the job (its checkpoint and the commits after it) and would cost a round without changes table reads.
TABLES_HELD = "tables"


def saved_query(job: JobSettings) -> dict[str, Any]:
    """What a saved delta link was made for: a changed resource, $select or $expand needs a full sync."""
    query: dict[str, Any] = {"resource": job.resource, "select": sorted(job.select or []), "delta": job.delta}
    if job.expand:  # only when set, so that the links saved before `expand` existed stay valid
        query["expand"] = sorted(job.expand)
    if job.cursor:
        query["cursor"] = job.cursor
    return query


def store_query(sink: Sink, job: JobSettings) -> str:
    """What a working store's tag says it answers: the job's query, and the output too, since two outputs may
    hold blobs with equal ETags."""
    return json.dumps({"output": sink.location(), **saved_query(job)}, sort_keys=True)


def _new_object_defaults(job: JobSettings) -> dict[str, Any]:
    """What every object of the job carries even when Graph's record says nothing (see SnapshotStore.apply)."""
    return {MANAGER: None} if MANAGER in (job.expand or ()) else {}


@dataclass(frozen=True)
class _RoundContext:
    """What every round of one run shares."""

    job: JobSettings
    tenant: str
    store: SnapshotStore
    query: str  # the store tag's query: the output and the job's saved query
    change_file: Callable[[bool], str]
    interrupted: Callable[[], bool]
    progress: Progress | None
    partial: PartialSnapshot | None  # the store holds only the chunks loaded (see graphsync.coldstore)


class RoundRunner:
    """Runs rounds for one output, with the working stores of this host."""

    def __init__(self, *, graph: GraphClient, sink: Sink, stores: WorkStores, tables: RoundTables = NO_TABLES) -> None:
        self._graph = graph
        self._sink = sink
        self._stores = stores
        self._tables = tables

    def run(
        self,
        job: JobSettings,
        tenant: str,
        state: dict[str, Any],
        change_file: Callable[[bool], str],
        *,
        interrupted: Callable[[], bool],
        progress: Progress | None = None,
        reconcile: bool = False,
    ) -> Round:
        """One round from ``state`` (the job's ``state.json``); ``change_file(full)`` names its change file.

        ``reconcile``: a full round even with a delta link, compared with the snapshot it replaces
        (:mod:`graphsync.reconcile`). The delta link is applied first, as an ordinary delta round of its own
        (published, with its change file): what delta reports is not drift, so the full round is compared with
        the snapshot delta brought up to date, not with the one published up to an interval ago.
        """
        delta_link = state.get("delta_link") if job.delta and state.get("query") == saved_query(job) else None
        version = self._sink.snapshot_version(tenant, job.name)  # publish only over this very snapshot
        if delta_link and version is None:
            log.warning("snapshot of %s/%s is missing; doing a full sync", tenant, job.name)
            delta_link = None
        held = state.get(TABLES_HELD) is True and state.get("query") == saved_query(job)
        if delta_link and not held and self._tables.needs_full(tenant, job):  # a new table: only a full round fills it
            delta_link = None
        query = store_query(self._sink, job)
        with self._stores.open(tenant, job.name) as store:
            refreshed = partial = None
            if delta_link and version is not None:
                try:
                    refreshed, partial = prepare(
                        store, self._sink, tenant, job.name, version=version, query=query, partial=not reconcile
                    )
                except (ValueError, KeyError, TypeError, sqlite3.Error):
                    log.warning("snapshot of %s/%s is unreadable; doing a full sync", tenant, job.name)
                    delta_link = None
            context = _RoundContext(job, tenant, store, query, change_file, interrupted, progress, partial)
            done = self._one(context, version, delta_link)
            if done.refill:  # a table lost the job's rounds (deleted meanwhile): a full round fills it, now
                log.warning("a table of %s/%s holds none of its rounds; running a full round", tenant, job.name)
                done = self._after(done, context, version)
            if reconcile and not done.full:  # caught up with delta: the store now holds what delta knows
                with saved_lines(store) as baseline:
                    done = self._after(done, context, version, baseline)
            done.refreshed = refreshed
            done.tables = self._tables.enabled
        return done

    def _after(
        self, caught_up: Round, context: _RoundContext, version: str | None, baseline: IO[bytes] | None = None
    ) -> Round:
        """A full round right after the delta round ``caught_up``, published over what that one published."""
        if caught_up.publication is not None:
            version = caught_up.publication.version
        done = self._one(context, version, None, baseline=baseline)
        done.pages += caught_up.pages
        done.changes += caught_up.changes
        return done

    def _one(
        self, context: _RoundContext, version: str | None, delta_link: str | None, baseline: IO[bytes] | None = None
    ) -> Round:
        """One round into the store (a delta round from ``delta_link``, else a full one), published over ``version``
        in one store transaction, then its change file; with ``baseline`` (snapshot lines), the drift from it."""
        job, tenant, store = context.job, context.tenant, context.store
        interrupted, progress = context.interrupted, context.progress
        done = Round()
        started = time.time()
        partial = context.partial if delta_link else None
        previous = partial.published() if partial else self._published(store, tenant, job.name, version, context.query)
        with tempfile.TemporaryFile(dir=store.path.parent) as changes:
            with store.transaction():
                if delta_link is None:
                    store.clear()
                done.full = delta_link is None
                url = delta_link or self._collection_url(job)
                try:
                    done.delta_link = self._fetch(
                        tenant, job, url, store, changes, done, interrupted, progress, partial
                    )
                except ResyncRequired as exc:
                    log.warning(
                        "delta token of %s/%s expired or invalid (%s); full resync",
                        tenant,
                        job.name,
                        exc.code,
                        extra={"tenant": tenant, "job": job.name},
                    )
                    done.full = done.resync = True
                    done.pages = done.changes = 0
                    partial = None
                    store.clear()
                    changes.seek(0)
                    changes.truncate()
                    url = self._collection_url(job)
                    done.delta_link = self._fetch(tenant, job, url, store, changes, done, interrupted, progress, None)
                if job.delta and done.delta_link is None:
                    raise MalformedResponse(f"delta round of {job.resource} ended without an @odata.deltaLink")
                if interrupted():
                    raise RunInterrupted("stopped before publishing")
                done.objects = partial.objects() if partial else store.count()
                if baseline is not None:
                    done.drift = compare(baseline, store.entries())
                if done.changes or done.full:
                    # Fenced: a replica that lost its lock fails here, publishes nothing, and rolls back.
                    done.publication = publish(
                        store,
                        self._sink,
                        tenant,
                        job.name,
                        version=version,
                        previous=previous,
                        touched=None if done.full else done.touched,
                        query=context.query,
                        partial=partial,
                    )
                    _log_publication(tenant, job.name, done.publication)
            if done.changes or done.full:  # a full round says so even when it received nothing
                changes.seek(0)
                self._sink.write_changes(tenant, job.name, context.change_file(done.full), changes)
                changes.seek(0)
                try:
                    self._tables.apply(AppliedRound(tenant, job, done.full, done.touched, store, changes, started))
                except TableNeedsFullRound as exc:
                    if done.full:
                        raise
                    log.warning("%s", exc, extra={"tenant": tenant, "job": job.name})
                    done.refill = True
        return done

    def _collection_url(self, job: JobSettings) -> str:
        return self._graph.collection_url(job.resource, select=job.select, expand=job.expand, delta=job.delta)

    def _published(
        self, store: SnapshotStore, tenant: str, job: str, version: str | None, query: str
    ) -> Published | None:
        """What this host knows of the published ``version``'s chunks, for :func:`publish`."""
        if version is None:
            return None
        tag = store.tag
        if tag is not None and tag.version == version and tag.query == query:
            chunks = store.chunks()
            return Published([chunk.block_id for chunk in chunks], chunks, tag.level)
        blocks = self._sink.snapshot_blocks(tenant, job)  # a full round: which chunks need no upload
        if blocks is None or blocks.version != version or not blocks.complete:
            return None
        return Published([block for block, _ in blocks.blocks], None, None)

    def _fetch(
        self,
        tenant: str,
        job: JobSettings,
        url: str,
        store: SnapshotStore,
        changes: IO[bytes],
        done: Round,
        interrupted: Callable[[], bool],
        progress: Progress | None,
        partial: PartialSnapshot | None,
    ) -> str | None:
        """Stream pages into the working store and the change file; return the round's delta link.

        Graph is asked for the next page while this one is applied (:func:`read_ahead`); each record is serialized
        once, for its change line, which the store reuses where the object is exactly the record.
        """
        source: Iterator[Page]
        if job.resource in SINGLETONS:  # one object, one request
            source = self._graph.singleton(tenant, url, job.resource.rpartition("/")[2])
        else:
            source = self._graph.pages(tenant, url, minimal=not done.full)
        pages = read_ahead(source, interrupted=interrupted, name=f"pages {tenant}")
        try:
            with contextlib.closing(pages):
                for page in pages:
                    for record in page.objects:
                        _check_record(record, job.resource)
                    lines = [encode(_change(record)) for record in page.objects]
                    changes.writelines(lines)
                    if partial is not None:  # the objects a page changes must be in the store before it applies
                        partial.load_covering(page.objects)
                    store.apply(page.objects, defaults=_new_object_defaults(job), lines=lines)
                    done.touch(record["id"] for record in page.objects)
                    done.pages += 1
                    done.changes += len(page.objects)
                    if progress:
                        progress(tenant, job.name, done.pages, done.changes)
                    if page.delta_link:
                        return page.delta_link
                    if interrupted():
                        raise RunInterrupted("stopped between pages")
        except StoppedWaiting as exc:
            raise RunInterrupted(str(exc)) from None
        return None


def _log_publication(tenant: str, job: str, publication: Publication) -> None:
    extra = {"tenant": tenant, "job": job}
    if not publication.changed:
        log.info("snapshot of %s/%s unchanged: nothing published", tenant, job, extra=extra)
        return
    log.info(
        "snapshot of %s/%s published: %d chunks, %d bytes; %d chunks (%d bytes) uploaded",
        tenant,
        job,
        publication.chunks,
        publication.size,
        publication.chunks_uploaded,
        publication.bytes_uploaded,
        extra=extra,
    )


_LINK_PROPERTIES = frozenset({MEMBERS_DELTA, OWNERS_DELTA, MANAGER_DELTA})


def _check_record(record: Any, resource: str) -> None:
    """What the working store relies on: a string id, and link changes (members, owners, manager) that are objects
    with ids."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise MalformedResponse(f"a record in {resource} has no string 'id'")
    for link in _LINK_PROPERTIES & record.keys():  # most records carry neither
        entries = record[link]
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries
        ):
            raise MalformedResponse(f"record {record['id']} in {resource} has a malformed '{link}'")


def _change(record: dict[str, Any]) -> dict[str, Any]:
    """A change-file line: the record as Graph sent it, or for a removal just its id and reason."""
    if "@removed" in record:
        return {"id": record["id"], "@removed": record["@removed"]}
    return record
