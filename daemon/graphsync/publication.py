"""Keeping a host's working store and the published snapshot in step, moving only the chunks that differ.

Two directions:

- :func:`refresh` makes the store equal the published version before a delta round. A store tagged with that
  version is used as it is (no I/O). Otherwise, where the medium has blocks, it reads the block list, keeps the
  chunks it already holds, drops those that are gone and reads only the missing ones (adjacent ones in one ranged
  read); else (a local directory, or a blob whose blocks are not whole lines) it loads the whole snapshot.
- :func:`publish` cuts the store into content-defined chunks — again only around the objects the round touched,
  when the store holds the published version's chunks — and hands the sink the new list, unless it equals the
  published one (then nothing is written). The sink uploads only the chunks the published version lacks. Chunks
  cut from scratch are kept on disk as they are cut (list and bytes, :class:`_Spool`), so they are serialized
  once; chunks cut again around touched objects are serialized a second time, from the store, just for those
  chunks. Memory holds one chunk at a time either way. A host without a store skips :func:`refresh` and publishes
  from a partial store (:mod:`graphsync.coldstore`).

A store is never trusted over the published version: the tag is set in the same SQLite transaction as the
content it describes, and only to a version that was read or written in this run.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
from collections import OrderedDict, deque
from collections.abc import Collection, Container, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Protocol, overload

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
from graphsync.jsoncodec import dumps, loads
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


def refresh(
    store: SnapshotStore,
    sink: Sink,
    tenant: str,
    job: str,
    *,
    version: str,
    query: str,
    blocks: SnapshotBlocks | None = None,
) -> Refreshed:
    """Make ``store`` equal the published snapshot ``version`` (tagged so), reading only what it lacks.

    ``blocks``: the snapshot's blocks, when the caller has listed them already."""
    tag = store.tag
    if tag is not None and tag.version == version and tag.query == query:
        return Refreshed(warm=True)
    blocks = blocks or sink.snapshot_blocks(tenant, job)
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
    missing = {block for block, _ in blocks.blocks if block not in held}
    for run, data in read_ahead(blocks, block_runs(blocks.blocks, missing)):
        read += len(data)
        offset = 0
        for block, size in run:
            chunks[block] = load_block(store, block, data[offset : offset + size])
            offset += size
    ordered = [chunks[block] for block, _ in blocks.blocks]
    objects = sum(chunk.count for chunk in ordered)
    if store.count() != objects:
        raise UnalignedBlocks(f"the store holds {store.count()} objects after reading, the blocks {objects}")
    store.set_tag(StoreTag(version, query, infer_level(ordered)), ordered)
    return Refreshed(warm=False, chunks_read=len(missing), bytes_read=read)


Run = list[tuple[str, int]]


def block_runs(blocks: Sequence[tuple[str, int]], wanted: Container[str]) -> list[tuple[int, Run]]:
    """Adjacent ``wanted`` blocks grouped into ``(offset, blocks)`` runs of at most about :data:`MAX_READ_BYTES`:
    one ranged read each, and memory bounded by one read whatever the snapshot's size."""
    runs: list[tuple[int, Run]] = []
    offset = run_bytes = 0
    previous_missing = False
    for block, size in blocks:
        missing = block in wanted
        if missing and previous_missing and run_bytes < MAX_READ_BYTES:
            runs[-1][1].append((block, size))
            run_bytes += size
        elif missing:
            runs.append((offset, [(block, size)]))
            run_bytes = size
        previous_missing = missing
        offset += size
    return runs


def read_ahead(blocks: SnapshotBlocks, runs: list[tuple[int, Run]]) -> Iterator[tuple[Run, bytes]]:
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


def load_block(store: SnapshotStore, block: str, data: bytes) -> ChunkRef:
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


class PartialStore(Protocol):
    """A working store that holds only the chunks a round needed of the published version (see
    :mod:`graphsync.coldstore`): what :func:`publish` reads instead of the store's own count and entries."""

    def objects(self) -> int:
        """How many objects the snapshot holds now, the chunks not loaded included."""
        ...

    def entries_after(self, after_id: str | None) -> Iterator[tuple[str, bytes]]:
        """Like :meth:`SnapshotStore.entries_after`, loading the chunks it passes through."""
        ...

    def load_all(self) -> None:
        """Load every chunk not loaded yet: the store is then the whole snapshot."""
        ...


class _Spool(Sequence[ChunkRef]):
    """The chunks cut from scratch, kept on disk beside the store instead of in memory: their list (a JSON line
    each) and their bytes. So memory holds one chunk whatever the snapshot's size (a million objects make ~16,000
    chunks), and the sink's reads take the bytes from here instead of serializing the store a second time.

    The sinks call ``read`` for a chunk right after iterating to it; the last :data:`RECENT` chunks iterated are
    remembered with their place in the file. Any other chunk is not found (``None``), and the caller serializes
    it from the store: slower, never wrong.
    """

    RECENT = 64

    def __init__(self, refs: IO[bytes], data: IO[bytes]) -> None:
        self._refs, self._data = refs, data
        self._count = 0
        self._recent: OrderedDict[str, int] = OrderedDict()  # block id -> where its bytes start in ``data``

    def cut(self, entries: Iterable[tuple[str, bytes]], level: int) -> Sequence[ChunkRef]:
        """:func:`chunk_lines`, kept here."""
        for chunk in chunk_lines(entries, level):
            ref = chunk.ref
            self._refs.write(dumps([ref.block_id, ref.first_id, ref.last_id, ref.count, ref.size]) + b"\n")
            self._data.write(chunk.data)
            self._count += 1
        self._refs.flush()
        self._data.flush()
        return self

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> ChunkRef: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ChunkRef]: ...

    def __getitem__(self, index: int | slice) -> ChunkRef | Sequence[ChunkRef]:
        """By position (reads the list up to there; publication only iterates)."""
        if isinstance(index, slice):
            return list(self)[index]
        position = index + self._count if index < 0 else index
        if not 0 <= position < self._count:
            raise IndexError(index)
        return next(itertools.islice(self, position, None))

    def __iter__(self) -> Iterator[ChunkRef]:
        """Each chunk in order, read with ``pread``: iterations do not share a file position."""
        fd, position, offset, pending = self._refs.fileno(), 0, 0, b""
        while block := os.pread(fd, 1 << 16, position):
            position += len(block)
            *lines, pending = (pending + block).split(b"\n")
            for line in lines:
                ref = ChunkRef(*loads(line))
                self._recent[ref.block_id] = offset
                if len(self._recent) > self.RECENT:
                    self._recent.popitem(last=False)
                offset += ref.size
                yield ref

    def read(self, chunk: ChunkRef) -> bytes | None:
        """``chunk``'s bytes if it was iterated to lately, else None."""
        offset = self._recent.get(chunk.block_id)
        return None if offset is None else os.pread(self._data.fileno(), chunk.size, offset)


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
    partial: PartialStore | None = None,
) -> Publication:
    """Publish the store over ``version`` unless its chunks equal the published ones.

    ``touched``: the ids this round changed, added or removed (``None`` after a full round). Runs inside the
    caller's store transaction; on success the store is tagged with the new version, unless it is ``partial``:
    a store holding only some chunks equals no version, and the next round on this host starts cold again.
    """
    with tempfile.TemporaryFile(dir=store.path.parent) as refs, tempfile.TemporaryFile(dir=store.path.parent) as data:
        return _publish(store, sink, tenant, job, version, previous, touched, query, partial, _Spool(refs, data))


def _publish(
    store: SnapshotStore,
    sink: Sink,
    tenant: str,
    job: str,
    version: str | None,
    previous: Published | None,
    touched: Collection[str] | None,
    query: str,
    partial: PartialStore | None,
    spool: _Spool,
) -> Publication:
    level = choose_level(partial.objects() if partial else store.count(), previous.level if previous else None)
    chunks: Sequence[ChunkRef]
    if (
        previous is not None
        and previous.chunks is not None
        and touched is not None
        and level == previous.level
        and cut_by_this_rule(previous.chunks, level)
    ):
        entries_after = partial.entries_after if partial else store.entries_after
        chunks = list(recut(previous.chunks, touched, entries_after, level))
    else:
        if partial:
            partial.load_all()
        chunks = spool.cut(store.entries(), level)
    if len(chunks) > MAX_BLOCKS:
        raise SnapshotTooLarge(f"{len(chunks)} chunks at level {level}: more than Azure's {MAX_BLOCKS} blocks")
    size = sum(chunk.size for chunk in chunks)
    if (
        previous is not None
        and version is not None
        and len(chunks) == len(previous.block_ids)
        and all(chunk.block_id == block for chunk, block in zip(chunks, previous.block_ids, strict=True))
    ):
        store.set_tag(None if partial else StoreTag(version, query, level), chunks)
        return Publication(version, changed=False, chunks=len(chunks), size=size)
    uploaded_chunks = uploaded_bytes = 0

    def read(chunk: ChunkRef) -> bytes:
        nonlocal uploaded_chunks, uploaded_bytes
        data = spool.read(chunk)
        if data is None:
            data = b"".join(line for _, line in store.entries(chunk.first_id, chunk.last_id))
        if block_id(data) != chunk.block_id:  # the store or the spool changed under us: a bug, never publish it
            raise RuntimeError(f"chunk {chunk.first_id}..{chunk.last_id} serialized differently twice")
        uploaded_chunks += 1
        uploaded_bytes += len(data)
        return data

    committed = frozenset(previous.block_ids if previous else ())
    new_version = sink.write_snapshot(tenant, job, chunks, read, if_version=version, committed=committed)
    store.set_tag(None if partial else StoreTag(new_version, query, level), chunks)
    return Publication(new_version, True, len(chunks), size, uploaded_chunks, uploaded_bytes)
