"""Keeping a host's working store and the published snapshot in step, moving only the chunks that differ.

Two directions:

- :func:`refresh` makes the store equal the published version before a delta round. A store tagged with that
  version is used as it is (no I/O). Otherwise, where the medium has blocks, it reads the block list, keeps the
  chunks it already holds, drops those that are gone and reads only the missing ones (adjacent ones in one ranged
  read); else (a local directory, or a blob whose blocks are not whole lines) it loads the whole snapshot.
- :func:`publish` cuts the store into content-defined chunks — again only around the objects the round touched,
  when the store holds the published version's chunks — and hands the sink the new list, unless it equals the
  published one (then nothing is written). The sink uploads only the chunks the published version lacks; their
  bytes are serialized a second time, from the store, just for those chunks, so memory holds one chunk at a time.

A store is never trusted over the published version: the tag is set in the same SQLite transaction as the
content it describes, and only to a version that was read or written in this run.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from graphsync.chunking import (
    MAX_BLOCKS,
    ChunkRef,
    block_id,
    choose_level,
    chunk_lines,
    cut_by_this_rule,
    infer_level,
    recut,
)
from graphsync.sinks import Sink, SnapshotBlocks
from graphsync.snapshot import SnapshotStore, StoreTag
from graphsync.storage import WriteConflict

log = logging.getLogger(__name__)

MAX_READ_BYTES = 8 * 1024 * 1024
READ_CONCURRENCY = 4


@dataclass(frozen=True)
class Refreshed:
    """What :func:`refresh` had to read: nothing when the store was warm."""

    warm: bool
    chunks_read: int = 0
    bytes_read: int = 0


@dataclass(frozen=True)
class Publication:
    """The snapshot after :func:`publish`: its version, chunks and size, and what this run uploaded."""

    version: str | None
    changed: bool
    chunks: int
    size: int
    chunks_uploaded: int = 0
    bytes_uploaded: int = 0


@dataclass(frozen=True)
class Published:
    """What this host knows of the version a round publishes over, for :func:`publish`.

    ``block_ids``: its blocks (a container) or this host's chunks of it (a directory). ``chunks``: the same with
    their id ranges, when the store holds exactly that version's chunks (then only touched ones are cut again).
    """

    block_ids: list[str]
    chunks: list[ChunkRef] | None
    level: int | None


class SnapshotTooLarge(Exception):
    """More chunks than Azure allows committed blocks: cannot happen with the levels, so say so if it does."""


class UnalignedBlocks(Exception):
    """A published block does not hold whole lines (written by an older graphsync): read the snapshot whole."""


def refresh(store: SnapshotStore, sink: Sink, tenant: str, job: str, *, version: str, query: str) -> Refreshed:
    """Make ``store`` equal the published snapshot ``version`` (tagged so), reading only what it lacks."""
    tag = store.tag
    if tag is not None and tag.version == version and tag.query == query:
        return Refreshed(warm=True)
    blocks = sink.snapshot_blocks(tenant, job)
    if blocks is not None and blocks.version is not None and blocks.version != version:
        raise WriteConflict(f"the snapshot of {tenant}/{job} was replaced during this run")
    if blocks is not None and blocks.complete:
        try:
            with store.transaction():
                return _read_missing_blocks(store, blocks, version, query)
        except UnalignedBlocks as exc:
            log.info("%s/%s: %s; reading the snapshot whole", tenant, job, exc)
    elif blocks is not None:
        log.info("%s/%s: the snapshot's blocks do not make up the blob (written whole?); reading it whole", tenant, job)
    return _read_whole(store, sink, tenant, job, version, query, cut_chunks=blocks is None)


def _read_missing_blocks(store: SnapshotStore, blocks: SnapshotBlocks, version: str, query: str) -> Refreshed:
    tag = store.tag
    held = {chunk.block_id: chunk for chunk in store.chunks()} if tag is not None and tag.query == query else {}
    if not held:
        store.clear()
    published = {block for block, _ in blocks.blocks}
    for chunk in held.values():
        if chunk.block_id not in published:
            store.drop_range(chunk.first_id, chunk.last_id)
    chunks: dict[str, ChunkRef] = dict(held)
    read = 0
    for run, data in _read_ahead(blocks, _missing_runs(blocks.blocks, held)):
        read += len(data)
        offset = 0
        for block, size in run:
            chunks[block] = _load_block(store, block, data[offset : offset + size])
            offset += size
    ordered = [chunks[block] for block, _ in blocks.blocks]
    objects = sum(chunk.count for chunk in ordered)
    if store.count() != objects:
        raise UnalignedBlocks(f"the store holds {store.count()} objects after reading, the blocks {objects}")
    store.set_tag(StoreTag(version, query, infer_level(ordered)), ordered)
    missing = sum(1 for block, _ in blocks.blocks if block not in held)
    return Refreshed(warm=False, chunks_read=missing, bytes_read=read)


Run = list[tuple[str, int]]


def _missing_runs(blocks: Sequence[tuple[str, int]], held: dict[str, ChunkRef]) -> list[tuple[int, Run]]:
    """Adjacent missing blocks grouped into ``(offset, blocks)`` runs of at most about :data:`MAX_READ_BYTES`: one
    ranged read each, and memory bounded by one read whatever the snapshot's size."""
    runs: list[tuple[int, Run]] = []
    offset = run_bytes = 0
    previous_missing = False
    for block, size in blocks:
        missing = block not in held
        if missing and previous_missing and run_bytes < MAX_READ_BYTES:
            runs[-1][1].append((block, size))
            run_bytes += size
        elif missing:
            runs.append((offset, [(block, size)]))
            run_bytes = size
        previous_missing = missing
        offset += size
    return runs


def _read_ahead(blocks: SnapshotBlocks, runs: list[tuple[int, Run]]) -> Iterator[tuple[Run, bytes]]:
    """Each run's bytes, in order, with up to :data:`READ_CONCURRENCY` reads in flight (each a round trip), so
    memory holds that many reads at most; the caller loads them into the store on its own thread."""

    def fetch(start: int, run: Run) -> bytes:
        return blocks.read(start, sum(size for _, size in run))

    with ThreadPoolExecutor(READ_CONCURRENCY, thread_name_prefix="read") as pool:
        pending: deque[tuple[Run, Future[bytes]]] = deque()
        upcoming = iter(runs)
        for start, run in itertools.islice(upcoming, READ_CONCURRENCY):
            pending.append((run, pool.submit(fetch, start, run)))
        while pending:
            run, future = pending.popleft()
            data = future.result()
            for start, following in itertools.islice(upcoming, 1):
                pending.append((following, pool.submit(fetch, start, following)))
            yield run, data


def _load_block(store: SnapshotStore, block: str, data: bytes) -> ChunkRef:
    """Load one block's lines into the store; it must hold whole lines for the chunk's id range to be known."""
    if not data.endswith(b"\n"):
        raise UnalignedBlocks(f"block {block} does not end at a line boundary")
    lines = data.splitlines(keepends=True)
    store.load(lines)
    first, last = json.loads(lines[0])["id"], json.loads(lines[-1])["id"]
    return ChunkRef(block, first, last, len(lines), len(data))


def _read_whole(
    store: SnapshotStore, sink: Sink, tenant: str, job: str, version: str, query: str, *, cut_chunks: bool
) -> Refreshed:
    """Load the whole published snapshot, of exactly ``version``.

    ``cut_chunks``: tag the store, with the chunks this host would cut from it (a medium without blocks, where they
    only tell whether the next round changed anything). With blocks that are not our chunks, leave it untagged:
    a tag's chunk list must only ever name blocks the published version really holds.
    """
    size = 0

    def counted() -> Iterator[bytes]:
        nonlocal size
        for line in sink.snapshot_lines(tenant, job, version=version):
            size += len(line)
            yield line

    with store.transaction():
        store.clear()
        store.load(counted())
        level = choose_level(store.count(), None)
        if cut_chunks:
            chunks = [chunk.ref for chunk in chunk_lines(store.entries(), level)]
            store.set_tag(StoreTag(version, query, level), chunks)
        else:  # its blocks are not our chunks: it becomes a tagged store once this host publishes
            store.set_tag(None)
    return Refreshed(warm=False, bytes_read=size)


class _Spool:
    """The bytes of the chunks cut from scratch, written to a temporary file beside the store as they are cut, so
    that the sink's reads take them from there instead of serializing the store a second time. Memory holds
    one chunk; the sinks read chunks in list order (skipping committed ones), so the file is read in order too.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._chunks: list[ChunkRef] = []  # the chunks whose bytes are in the file, in order
        self._position = self._offset = 0  # the next of them, and where its bytes start

    def cut(self, entries: Iterable[tuple[str, bytes]], level: int) -> list[ChunkRef]:
        """:func:`chunk_lines`, keeping each chunk's bytes."""
        for chunk in chunk_lines(entries, level):
            self._file.write(chunk.data)
            self._chunks.append(chunk.ref)
        return self._chunks

    def read(self, chunk: ChunkRef) -> bytes | None:
        """``chunk``'s bytes if it was cut here and is asked for in order, else None (then the caller serializes
        it from the store)."""
        while self._position < len(self._chunks) and self._chunks[self._position] is not chunk:
            self._offset += self._chunks[self._position].size
            self._position += 1
        if self._position == len(self._chunks):
            return None
        self._file.seek(self._offset)
        data = self._file.read(chunk.size)
        self._offset += chunk.size
        self._position += 1
        return data


def publish(
    store: SnapshotStore,
    sink: Sink,
    tenant: str,
    job: str,
    *,
    version: str | None,
    previous: Published | None,
    touched: Collection[str] | None,
    query: str,
) -> Publication:
    """Publish the store over ``version`` unless its chunks equal the published ones.

    ``touched``: the ids this round changed, added or removed (``None`` after a full round). Runs inside the
    caller's store transaction; on success the store is tagged with the new version.
    """
    with tempfile.TemporaryFile(dir=store.path.parent) as spool:
        return _publish(store, sink, tenant, job, version, previous, touched, query, _Spool(spool))


def _publish(
    store: SnapshotStore,
    sink: Sink,
    tenant: str,
    job: str,
    version: str | None,
    previous: Published | None,
    touched: Collection[str] | None,
    query: str,
    spool: _Spool,
) -> Publication:
    level = choose_level(store.count(), previous.level if previous else None)
    if (
        previous is not None
        and previous.chunks is not None
        and touched is not None
        and level == previous.level
        and cut_by_this_rule(previous.chunks, level)
    ):
        chunks = list(recut(previous.chunks, touched, store.entries_after, level))
    else:
        chunks = spool.cut(store.entries(), level)
    if len(chunks) > MAX_BLOCKS:
        raise SnapshotTooLarge(f"{len(chunks)} chunks at level {level}: more than Azure's {MAX_BLOCKS} blocks")
    size = sum(chunk.size for chunk in chunks)
    if previous is not None and version is not None and [chunk.block_id for chunk in chunks] == previous.block_ids:
        store.set_tag(StoreTag(version, query, level), chunks)
        return Publication(version, changed=False, chunks=len(chunks), size=size)
    uploaded: list[int] = []

    def read(chunk: ChunkRef) -> bytes:
        data = spool.read(chunk)
        if data is None:
            data = b"".join(line for _, line in store.entries(chunk.first_id, chunk.last_id))
        if block_id(data) != chunk.block_id:  # the store or the spool changed under us: a bug, never publish it
            raise RuntimeError(f"chunk {chunk.first_id}..{chunk.last_id} serialized differently twice")
        uploaded.append(len(data))
        return data

    committed = frozenset(previous.block_ids if previous else ())
    new_version = sink.write_snapshot(tenant, job, chunks, read, if_version=version, committed=committed)
    store.set_tag(StoreTag(new_version, query, level), chunks)
    return Publication(new_version, True, len(chunks), size, len(uploaded), sum(uploaded))
