"""A delta round on a host without a working store reads only the chunks holding what the round touches.

Without a store (a new replica, a CronJob pod on an ``emptyDir``, a store of another query), the published
snapshot's index (:mod:`graphsync.chunkindex`, verified against the committed block list) says which block holds
which ids. The round then starts from an empty store and, before each page is applied, loads the chunks covering
that page's ids (a partial update merges into the stored object, so the object must be there first; a delete must
find it). :func:`graphsync.publication.publish` cuts chunks again only around the touched ids, and the neighbours
it walks into are loaded as it reaches them. The object count comes from the index. Such a store holds only part of
the snapshot, so it is never tagged: the next round on the host starts cold again.

Anything else (a warm or stale store, a directory, no index or one that does not match the committed blocks, a
reconciling run, which compares the whole snapshot) goes through :func:`graphsync.publication.refresh` as before.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from graphsync.chunkindex import UnusableIndex
from graphsync.chunking import ChunkRef, infer_level
from graphsync.publication import Published, Refreshed, block_runs, load_block, read_ahead, refresh
from graphsync.sinks import Sink, SnapshotBlocks
from graphsync.snapshot import SnapshotStore
from graphsync.storage import WriteConflict

log = logging.getLogger(__name__)


class IndexDisagrees(Exception):
    """A block read does not hold what the verified index said: a bug in the writer; never publish over it."""


class PartialSnapshot:
    """The published version ``blocks`` with its ``chunks`` (from the index), of which the store holds those loaded.

    Implements :class:`graphsync.publication.PartialStore`.
    """

    def __init__(self, store: SnapshotStore, blocks: SnapshotBlocks, chunks: list[ChunkRef]) -> None:
        self._store = store
        self._blocks = blocks
        self._chunks = chunks
        self._last_ids = [chunk.last_id for chunk in chunks]
        self._position = {chunk.block_id: n for n, chunk in enumerate(chunks)}
        self._published_objects = sum(chunk.count for chunk in chunks)
        self._loaded: set[int] = set()
        self._loaded_objects = 0
        self.chunks_read = 0
        self.bytes_read = 0

    def published(self) -> Published:
        """The published version, for :func:`graphsync.publication.publish`."""
        return Published([chunk.block_id for chunk in self._chunks], self._chunks, infer_level(self._chunks))

    def load_covering(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Load the chunks where the records' ids are or would be (as :func:`graphsync.chunking.recut` places
        them: an id between two chunks belongs to the later one, past the last chunk to the last)."""
        if not self._chunks:
            return
        last = len(self._chunks) - 1
        self._load({min(bisect.bisect_left(self._last_ids, record["id"]), last) for record in records})

    def load_all(self) -> None:
        self._load(range(len(self._chunks)))

    def objects(self) -> int:
        return self._published_objects - self._loaded_objects + self._store.count()

    def entries_after(self, after_id: str | None) -> Iterator[tuple[str, bytes]]:
        """``(id, line)`` after ``after_id``, sorted by id, loading each chunk as the walk enters its id range."""
        start = 0 if after_id is None else bisect.bisect_right(self._last_ids, after_id)
        lower = after_id
        for position in range(start, len(self._chunks)):
            self._load((position,))
            yield from self._stored(lower, self._last_ids[position])
            lower = self._last_ids[position]
        yield from self._stored(lower, None)

    def _stored(self, after_id: str | None, last_id: str | None) -> Iterator[tuple[str, bytes]]:
        """The store's entries in ``(after_id, last_id]``. The query ends with this generator (its last reference
        goes), so no SELECT is open while the next chunk loads."""
        for object_id, line in self._store.entries_after(after_id):
            if last_id is not None and object_id > last_id:
                return
            yield object_id, line

    def _load(self, positions: Iterable[int]) -> None:
        wanted = {self._chunks[n].block_id for n in positions if n not in self._loaded}
        if not wanted:
            return
        for run, data in read_ahead(self._blocks, block_runs(self._blocks.blocks, wanted)):
            self.bytes_read += len(data)
            offset = 0
            for block, size in run:
                position = self._position[block]
                if load_block(self._store, block, data[offset : offset + size]) != self._chunks[position]:
                    raise IndexDisagrees(
                        f"block {block} does not hold what the snapshot's index says; delete the index blob "
                        "(snapshot.index.json.gz beside the snapshot) and new hosts read the blocks instead"
                    )
                self._loaded.add(position)
                self._loaded_objects += self._chunks[position].count
                self.chunks_read += 1
                offset += size


def prepare(
    store: SnapshotStore,
    sink: Sink,
    tenant: str,
    job: str,
    *,
    version: str,
    query: str,
    partial: bool,
) -> tuple[Refreshed, PartialSnapshot | None]:
    """Get the store ready for a delta round over ``version``: as a partial store where it holds nothing usable
    and the published index can be trusted (``partial``: the caller allows it), else by :func:`refresh`."""
    extra = {"tenant": tenant, "job": job}
    tag = store.tag
    blocks = None
    if partial and (tag is None or tag.query != query):  # a warm or stale store lacks only what changed
        blocks = sink.snapshot_blocks(tenant, job)
        cold = _cold_start(store, blocks, tenant, job, version)
        if cold is not None:
            snapshot, index_bytes = cold
            log.info(
                "%s/%s: no working store on this host; reading the index (%d bytes) and only the chunks this "
                "round touches",
                tenant,
                job,
                index_bytes,
                extra=extra,
            )
            return Refreshed(warm=False, bytes_read=index_bytes), snapshot
    refreshed = refresh(store, sink, tenant, job, version=version, query=query, blocks=blocks)
    if not refreshed.warm:
        log.info(
            "working store of %s/%s brought up to date: %d chunks, %d bytes read",
            tenant,
            job,
            refreshed.chunks_read,
            refreshed.bytes_read,
            extra=extra,
        )
    return refreshed, None


def _cold_start(
    store: SnapshotStore, blocks: SnapshotBlocks | None, tenant: str, job: str, version: str
) -> tuple[PartialSnapshot, int] | None:
    """An emptied store over the published chunks, when the index describes exactly the committed blocks."""
    if blocks is None or not blocks.complete:
        return None
    if blocks.version != version:
        raise WriteConflict(f"the snapshot of {tenant}/{job} was replaced during this run")
    try:
        chunks, index_bytes = blocks.read_index()
    except UnusableIndex as exc:
        log.info("%s/%s: %s; reading the blocks", tenant, job, exc, extra={"tenant": tenant, "job": job})
        return None
    with store.transaction():
        store.clear()
    return PartialSnapshot(store, blocks, chunks), index_bytes
