"""Content-defined chunks: boundaries that follow the ids, so a change moves one chunk and nothing else."""

from __future__ import annotations

import random
import uuid

from graphsync.chunking import (
    BLOCK_ID_LENGTH,
    LEVEL_DOWN_CHUNKS,
    LEVEL_UP_CHUNKS,
    MAX_BLOCKS,
    MAX_OBJECTS,
    MEAN_OBJECTS,
    MIN_OBJECTS,
    Chunk,
    choose_level,
    chunk_lines,
    infer_level,
    level_for,
)


def _ids(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return sorted(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n))


def _entries(ids: list[str], body: dict[str, str] | None = None) -> list[tuple[str, bytes]]:
    body = body or {}
    return [(i, f'{{"id":"{i}","v":"{body.get(i, "x")}"}}\n'.encode()) for i in ids]


def _cut(entries: list[tuple[str, bytes]], level: int = 0) -> list[Chunk]:
    return list(chunk_lines(entries, level))


def test_chunks_hold_every_line_once_in_order_within_the_size_bounds() -> None:
    entries = _entries(_ids(20_000))
    chunks = _cut(entries)
    assert b"".join(c.data for c in chunks) == b"".join(line for _, line in entries)
    assert sum(c.ref.count for c in chunks) == len(entries)
    assert all(MIN_OBJECTS <= c.ref.count <= MAX_OBJECTS for c in chunks[:-1])
    mean = len(entries) / len(chunks)
    assert 0.8 * MEAN_OBJECTS < mean < 1.2 * MEAN_OBJECTS
    assert all(len(c.ref.block_id) == BLOCK_ID_LENGTH for c in chunks)
    assert [c.ref.first_id for c in chunks] == sorted(c.ref.first_id for c in chunks)


def test_an_update_changes_only_the_chunk_that_holds_the_object() -> None:
    ids = _ids(10_000)
    before = _cut(_entries(ids))
    changed = random.Random(2).sample(ids, 5)
    after = _cut(_entries(ids, {i: "changed" for i in changed}))
    new = {c.ref.block_id for c in after} - {c.ref.block_id for c in before}
    holding = {c.ref.block_id for c in after if any(c.ref.first_id <= i <= c.ref.last_id for i in changed)}
    assert new == holding and 1 <= len(new) <= 5
    assert [c.ref.first_id for c in after] == [c.ref.first_id for c in before]


def test_inserts_and_deletes_disturb_only_their_neighbourhood() -> None:
    ids = _ids(10_000)
    before = {c.ref.block_id for c in _cut(_entries(ids))}
    rng = random.Random(3)
    removed = set(rng.sample(ids, 10))
    added = _ids(10, seed=99)
    after = _cut(_entries(sorted((set(ids) - removed) | set(added))))
    new = [c for c in after if c.ref.block_id not in before]
    # Each edit rewrites its chunk and, when it moves a boundary, the next one or two: never the rest.
    assert len(new) <= 3 * (len(removed) + len(added))
    assert len(after) - len(new) > 0.8 * len(after)


def test_equal_objects_give_equal_chunks_on_any_replica() -> None:
    entries = _entries(_ids(3_000))
    assert [c.ref for c in _cut(entries)] == [c.ref for c in _cut(list(entries))]


def test_one_huge_object_is_a_chunk_of_its_own() -> None:
    ids = _ids(100)
    entries = _entries(ids)
    big = ids[50]
    entries[50] = (big, b'{"id":"' + big.encode() + b'","members":"' + b"m" * (9 * 1024 * 1024) + b'"}\n')
    chunks = _cut(entries)
    (holder,) = [c for c in chunks if c.ref.first_id <= big <= c.ref.last_id]
    assert holder.ref.last_id == big  # the chunk ends right after it, whatever the ids say


def test_levels_keep_several_million_objects_under_azures_block_limit() -> None:
    for objects in (0, 100_000, 2_000_000, 5_000_000, 20_000_000, 200_000_000):
        level = level_for(objects)
        assert objects / (MEAN_OBJECTS << level) <= LEVEL_UP_CHUNKS < MAX_BLOCKS
    assert level_for(1_000_000) == 0  # a million objects: ~16k blocks of ~64 objects


def test_a_level_changes_only_when_the_chunk_count_leaves_its_band() -> None:
    threshold = LEVEL_UP_CHUNKS * MEAN_OBJECTS
    assert choose_level(threshold, None) == 0
    assert choose_level(threshold + 100, 0) == 1
    # Hovering around the threshold keeps the level: no reshuffle of every chunk each round.
    assert choose_level(threshold - 100, 1) == 1
    assert choose_level(threshold + 100, 1) == 1
    assert choose_level(LEVEL_DOWN_CHUNKS * (MEAN_OBJECTS << 1) - 1, 1) == 0


def test_the_level_of_a_published_snapshot_is_inferred_from_its_counts() -> None:
    for level in (0, 1, 3):
        objects = 40_000 * (MEAN_OBJECTS << level) // 2
        chunks = len(_cut(_entries(_ids(objects // 64)), level)) * 64  # measured mean, scaled up
        assert infer_level(objects, chunks) == level
    assert infer_level(500, 9) == 0  # few chunks: always level 0
