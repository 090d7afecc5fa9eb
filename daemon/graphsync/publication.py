"""Keeping a host's working store and the published snapshot in step, moving only the chunks that differ.

Two directions:

- :func:`refresh` makes the store equal the published version before a delta round. A store tagged with that
  version is used as it is (no I/O). Otherwise, where the medium has blocks, it reads the block list, keeps the
  chunks it already holds, drops those that are gone and reads only the missing ones (adjacent ones in one ranged
  read); else (a local directory, or a blob whose blocks are not whole lines) it loads the whole snapshot.
- :func:`publish` cuts the store into content-defined chunks and hands the sink the new list, unless it equals
  the published one (then nothing is written). The sink uploads only the chunks the published version lacks; their
  bytes are serialized a second time, from the store, just for those chunks, so memory holds one chunk at a time.

A store is never trusted over the published version: the tag is set in the same SQLite transaction as the
content it describes, and only to a version that was read or written in this run.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from graphsync.chunking import ChunkRef, block_id, choose_level, chunk_lines, infer_level
from graphsync.sinks import Sink
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


class UnalignedBlocks(Exception):
    """A published block does not hold whole lines (written by an older graphsync): read the snapshot whole."""


def refresh(store: SnapshotStore, sink: Sink, tenant: str, job: str, *, version: str, query: str) -> Refreshed:
    """Make ``store`` equal the published snapshot ``version`` (tagged so), reading only what it lacks."""
    tag = store.tag
    if tag is not None and tag.version == version and tag.query == query:
        return Refreshed(warm=True)
    blocks = sink.snapshot_blocks(tenant, job)
    if blocks is not None and blocks.etag != version:
        raise WriteConflict(f"the snapshot of {tenant}/{job} was replaced during this run")
    if blocks is not None:
        try:
            with store.transaction():
                return _read_missing_blocks(store, sink, tenant, job, version, query, blocks.blocks)
        except UnalignedBlocks as exc:
            log.info("%s/%s: %s; reading the snapshot whole", tenant, job, exc)
    return _read_whole(store, sink, tenant, job, version, query, cut_chunks=blocks is None)


def _read_missing_blocks(
    store: SnapshotStore,
    sink: Sink,
    tenant: str,
    job: str,
    version: str,
    query: str,
    blocks: Sequence[tuple[str, int]],
) -> Refreshed:
    tag = store.tag
    held = {chunk.block_id: chunk for chunk in store.chunks()} if tag is not None and tag.query == query else {}
    if not held:
        store.clear()
    published = {block for block, _ in blocks}
    for chunk in held.values():
        if chunk.block_id not in published:
            store.drop_range(chunk.first_id, chunk.last_id)
    chunks: dict[str, ChunkRef] = dict(held)
    read = 0

    def fetch(start: int, run: list[tuple[str, int]]) -> bytes:
        return sink.read_snapshot_range(tenant, job, start, sum(size for _, size in run), version=version)

    for run, data in _read_ahead(fetch, _missing_runs(blocks, held)):
        read += len(data)
        offset = 0
        for block, size in run:
            chunk = _load_block(store, block, data[offset : offset + size])
            chunks[block] = chunk
            offset += size
    ordered = [chunks[block] for block, _ in blocks]
    objects = sum(chunk.count for chunk in ordered)
    if store.count() != objects:
        raise UnalignedBlocks(f"the store holds {store.count()} objects after reading, the blocks {objects}")
    store.set_tag(StoreTag(version, query, infer_level(objects, len(ordered))), ordered)
    missing = len(blocks) - sum(1 for block, _ in blocks if block in held)
    return Refreshed(warm=False, chunks_read=missing, bytes_read=read)


def _missing_runs(
    blocks: Sequence[tuple[str, int]], held: dict[str, ChunkRef]
) -> list[tuple[int, list[tuple[str, int]]]]:
    """Adjacent missing blocks grouped into ``(offset, blocks)`` runs of at most about :data:`MAX_READ_BYTES`: one
    ranged read each, and memory bounded by one read whatever the snapshot's size."""
    runs: list[tuple[int, list[tuple[str, int]]]] = []
    offset = 0
    previous_missing = False
    for block, size in blocks:
        missing = block not in held
        if missing and previous_missing and sum(s for _, s in runs[-1][1]) < MAX_READ_BYTES:
            runs[-1][1].append((block, size))
        elif missing:
            runs.append((offset, [(block, size)]))
        previous_missing = missing
        offset += size
    return runs


def _read_ahead(
    fetch: Callable[[int, list[tuple[str, int]]], bytes], runs: list[tuple[int, list[tuple[str, int]]]]
) -> Iterator[tuple[list[tuple[str, int]], bytes]]:
    """Each run's bytes, in order, with up to :data:`READ_CONCURRENCY` reads in flight (each a round trip), so
    memory holds that many reads at most; the caller loads them into the store on its own thread."""
    with ThreadPoolExecutor(READ_CONCURRENCY, thread_name_prefix="read") as pool:
        pending: deque[tuple[list[tuple[str, int]], Future[bytes]]] = deque()
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
    if not data.endswith(b"\n") and data:
        raise UnalignedBlocks(f"block {block} does not end at a line boundary")
    lines = data.splitlines(keepends=True)
    if not lines:
        raise UnalignedBlocks(f"block {block} is empty")
    store.load(lines)
    first, last = json.loads(lines[0])["id"], json.loads(lines[-1])["id"]
    return ChunkRef(block, first, last, len(lines), len(data))


def _read_whole(
    store: SnapshotStore, sink: Sink, tenant: str, job: str, version: str, query: str, *, cut_chunks: bool
) -> Refreshed:
    """Load the whole published snapshot.

    ``cut_chunks``: record the chunks this host would cut from it (a medium without blocks, where they only tell
    whether the next round changed anything). With blocks that are not our chunks, record none: the chunk list
    must only ever name blocks the published version really holds, or a later commit would name missing ones.
    """
    size = 0

    def counted() -> Iterator[bytes]:
        nonlocal size
        for line in sink.snapshot_lines(tenant, job):
            size += len(line)
            yield line

    with store.transaction():
        store.clear()
        store.load(counted())
        level = choose_level(store.count(), None)
        chunks = [chunk.ref for chunk in chunk_lines(store.entries(), level)] if cut_chunks else []
        store.set_tag(StoreTag(version, query, level), chunks)
    return Refreshed(warm=False, chunks_read=len(chunks), bytes_read=size)


def publish(
    store: SnapshotStore,
    sink: Sink,
    tenant: str,
    job: str,
    *,
    version: str | None,
    previous: Sequence[str] | None,
    previous_level: int | None,
    query: str,
) -> Publication:
    """Publish the store over ``version`` unless its chunks equal ``previous`` (the published block IDs).

    Runs inside the caller's store transaction; on success the store is tagged with the new version.
    """
    level = choose_level(store.count(), previous_level)
    chunks = [chunk.ref for chunk in chunk_lines(store.entries(), level)]
    size = sum(chunk.size for chunk in chunks)
    if previous is not None and version is not None and [chunk.block_id for chunk in chunks] == list(previous):
        store.set_tag(StoreTag(version, query, level), chunks)
        return Publication(version, changed=False, chunks=len(chunks), size=size)
    uploaded: list[int] = []

    def read(chunk: ChunkRef) -> bytes:
        data = b"".join(line for _, line in store.entries(chunk.first_id, chunk.last_id))
        if block_id(data) != chunk.block_id:  # the store changed between the two passes: a bug, never publish it
            raise RuntimeError(f"chunk {chunk.first_id}..{chunk.last_id} serialized differently twice")
        uploaded.append(len(data))
        return data

    new_version = sink.write_snapshot(
        tenant, job, chunks, read, if_version=version, committed=frozenset(previous or ())
    )
    store.set_tag(StoreTag(new_version, query, level), chunks)
    return Publication(new_version, True, len(chunks), size, len(uploaded), sum(uploaded))
