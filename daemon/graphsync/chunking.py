"""Content-defined chunks of a snapshot: runs of consecutive objects whose boundaries come from the ids themselves.

A snapshot is sorted by id, so a chunk that ends "after an id whose hash meets a rule" ends at the same id in
every round: a change to one object changes the bytes of its chunk only (and, when it adds or removes a boundary
id, its neighbour), so a round with k changes re-uploads about k chunks and a stale replica downloads about k
chunks, whatever the directory's size. A chunk is named by a hash of its bytes, so equal chunks have equal names
on every replica and in every round: that name is the blob's block ID.

Why the *level*: Azure allows 50,000 committed blocks per blob. Small chunks make a round with a few changes cheap;
many millions of objects need bigger ones. Level ``L`` multiplies the chunk size by ``2**L``; it follows the
object count with hysteresis (:func:`choose_level`), so a count that hovers around a threshold does not reshuffle
every chunk each round. Whatever the level, the chunks are a pure function of (objects, level): two replicas that
agree on both write byte-identical blobs with identical block lists.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

# Level 0: a boundary is allowed once a chunk holds MIN_OBJECTS, taken after an id whose hash is 0 modulo
# BOUNDARY_MODULUS, and forced at MAX_OBJECTS: chunks of about 16 + 48 = 64 objects on average. A round with 100
# random changes in a 100,000-object snapshot then touches ~100 of ~1,560 chunks: about 6 % of the bytes.
MIN_OBJECTS = 16
BOUNDARY_MODULUS = 48
MAX_OBJECTS = 256
MEAN_OBJECTS = MIN_OBJECTS + BOUNDARY_MODULUS
# A chunk also ends once it holds this many bytes, so a block exceeds it by one line at most (a run of huge groups
# is cut into several blocks).
MAX_BYTES = 8 * 1024 * 1024
# Azure: at most 50,000 committed blocks per blob. The level keeps the expected count between these.
MAX_BLOCKS = 50_000
LEVEL_UP_CHUNKS = 32_000
LEVEL_DOWN_CHUNKS = 8_000
# Block IDs must have one length within a blob (Azure): 32 hex characters, 128 bits of SHA-256.
BLOCK_ID_LENGTH = 32


@dataclass(frozen=True)
class ChunkRef:
    """A chunk without its bytes: their block ID, the id range and object count it covers, its size."""

    block_id: str
    first_id: str
    last_id: str
    count: int
    size: int


@dataclass(frozen=True)
class Chunk:
    """Consecutive snapshot lines and what names them."""

    ref: ChunkRef
    data: bytes


def block_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:BLOCK_ID_LENGTH]


def _boundary_hash(object_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(object_id.encode(), digest_size=8).digest(), "big")


def chunk_lines(lines: Iterable[tuple[str, bytes]], level: int = 0) -> Iterator[Chunk]:
    """Cut ``(id, line)`` pairs, sorted by id, into chunks; memory holds one chunk at a time."""
    scale = 1 << level
    min_objects, modulus, max_objects = MIN_OBJECTS * scale, BOUNDARY_MODULUS * scale, MAX_OBJECTS * scale
    buffer: list[bytes] = []
    size = 0
    first_id = ""
    for object_id, line in lines:
        if not buffer:
            first_id = object_id
        buffer.append(line)
        size += len(line)
        count = len(buffer)
        if (
            (count >= min_objects and _boundary_hash(object_id) % modulus == 0)
            or count >= max_objects
            or size >= MAX_BYTES
        ):
            yield _chunk(buffer, first_id, object_id)
            buffer, size = [], 0
    if buffer:
        yield _chunk(buffer, first_id, object_id)


def _chunk(lines: list[bytes], first_id: str, last_id: str) -> Chunk:
    data = b"".join(lines)
    return Chunk(ChunkRef(block_id(data), first_id, last_id, len(lines), len(data)), data)


def level_for(objects: int) -> int:
    """The smallest level whose expected chunk count stays under :data:`LEVEL_UP_CHUNKS`."""
    if objects <= LEVEL_UP_CHUNKS * MEAN_OBJECTS:
        return 0
    return math.ceil(math.log2(objects / (LEVEL_UP_CHUNKS * MEAN_OBJECTS)))


def choose_level(objects: int, previous: int | None) -> int:
    """Keep ``previous`` while its expected chunk count stays within [LEVEL_DOWN_CHUNKS, LEVEL_UP_CHUNKS].

    ``previous`` is ``None`` when nothing is published yet. Leaving the band jumps to :func:`level_for`.
    """
    if previous is None:
        return level_for(objects)
    expected = objects / (MEAN_OBJECTS << previous)
    if expected > LEVEL_UP_CHUNKS or (previous > 0 and expected < LEVEL_DOWN_CHUNKS):
        return level_for(objects)
    return previous


def infer_level(chunks: Sequence[ChunkRef]) -> int:
    """The level a published snapshot was cut at, from its chunks.

    Thousands of chunks average out to within a few per cent of ``MEAN_OBJECTS << level``; chunks that ended on
    :data:`MAX_BYTES` are left out of the average (huge objects, not the level, cut them). A small snapshot, where
    the average is noisy, is always level 0, since :func:`choose_level` leaves higher levels below
    ``LEVEL_DOWN_CHUNKS`` chunks.
    """
    regular = [chunk for chunk in chunks if chunk.size < MAX_BYTES]
    objects = sum(chunk.count for chunk in regular)
    if len(chunks) < LEVEL_DOWN_CHUNKS // 2 or not regular or objects <= 0:
        return 0
    return max(0, round(math.log2(objects / len(regular) / MEAN_OBJECTS)))


def recut(
    old: Sequence[ChunkRef],
    touched: Iterable[str],
    entries_after: Callable[[str | None], Iterable[tuple[str, bytes]]],
    level: int,
) -> Iterator[ChunkRef]:
    """The chunks of a snapshot that was ``old`` (cut at ``level``) before the objects ``touched`` changed, were
    added or removed, cutting again only around them: the result equals cutting the whole snapshot.

    A boundary depends only on the objects since the previous one, so once a chunk cut again ends where an old one
    ended, the old chunks after it stand until the next touched one, where cutting starts again.
    ``entries_after(id)`` gives the snapshot's ``(id, line)`` after ``id`` (from the start for ``None``). Costs the
    touched chunks and their neighbours, not the snapshot.
    """
    if not old:
        yield from (chunk.ref for chunk in chunk_lines(entries_after(None), level))
        return
    last_ids = [chunk.last_id for chunk in old]
    ends = {chunk.last_id: index for index, chunk in enumerate(old)}
    affected = {min(bisect.bisect_left(last_ids, object_id), len(old) - 1) for object_id in touched}
    position = 0  # the first old chunk not yet passed
    for start in sorted(affected):
        if start < position:
            continue  # cut again already, in the region of an earlier touched chunk
        yield from old[position:start]
        position = len(old)
        for chunk in chunk_lines(entries_after(old[start - 1].last_id if start else None), level):
            yield chunk.ref
            if chunk.ref.last_id in ends:  # back on an old boundary: what follows is as it was, or touched
                position = ends[chunk.ref.last_id] + 1
                break
    yield from old[position:]


def cut_by_this_rule(chunks: Sequence[ChunkRef], level: int) -> bool:
    """Whether ``chunks`` can have been cut by :func:`chunk_lines` at ``level`` (blocks of an older graphsync were
    ~4 MiB of any objects): only then can :func:`recut` build on them."""
    return all(chunk.count <= MAX_OBJECTS << level for chunk in chunks)
