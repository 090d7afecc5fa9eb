"""Content-defined chunks: boundaries that follow the ids, so a change moves one chunk and nothing else."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest

from graphsync.chunking import (
    BLOCK_ID_LENGTH,
    LEVEL_DOWN_CHUNKS,
    LEVEL_UP_CHUNKS,
    MAX_BLOCKS,
    MAX_BYTES,
    MAX_OBJECTS,
    MEAN_OBJECTS,
    MIN_OBJECTS,
    Chunk,
    ChunkRef,
    choose_level,
    chunk_lines,
    infer_level,
    level_for,
    recut,
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


def test_a_huge_object_ends_its_chunk_so_no_block_grows_past_one_line_over_the_limit() -> None:
    ids = _ids(100)
    entries = _entries(ids)
    big = ids[50]
    entries[50] = (big, b'{"id":"' + big.encode() + b'","members":"' + b"m" * (9 * 1024 * 1024) + b'"}\n')
    chunks = _cut(entries)
    (holder,) = [c for c in chunks if c.ref.first_id <= big <= c.ref.last_id]
    assert holder.ref.last_id == big  # the chunk ends right after it, whatever the ids say
    assert all(c.ref.size < MAX_BYTES + len(entries[50][1]) for c in chunks)


def test_a_level_makes_chunks_twice_as_big_so_millions_of_objects_stay_under_the_block_limit() -> None:
    ids = _ids(60_000)
    for level in (0, 1, 2):
        mean = len(ids) / len(_cut(_entries(ids), level))
        assert 0.8 * (MEAN_OBJECTS << level) < mean < 1.2 * (MEAN_OBJECTS << level)
    for objects in (100_000, 2_000_000, 5_000_000, 20_000_000, 200_000_000):
        level = level_for(objects)
        expected_blocks = objects / (MEAN_OBJECTS << level)
        assert expected_blocks <= LEVEL_UP_CHUNKS < MAX_BLOCKS, objects
    assert level_for(1_000_000) == 0  # a million objects: ~16k blocks of ~64 objects


def test_a_level_changes_only_when_the_chunk_count_leaves_its_band() -> None:
    threshold = LEVEL_UP_CHUNKS * MEAN_OBJECTS
    assert choose_level(threshold, None) == 0
    assert choose_level(threshold + 100, 0) == 1
    # Hovering around the threshold keeps the level: no reshuffle of every chunk each round.
    assert choose_level(threshold - 100, 1) == 1
    assert choose_level(threshold + 100, 1) == 1
    assert choose_level(LEVEL_DOWN_CHUNKS * (MEAN_OBJECTS << 1) - 1, 1) == 0


def test_the_level_of_published_chunks_is_inferred_even_with_huge_objects_among_them() -> None:
    for level in (0, 1, 3):
        sample = [c.ref for c in _cut(_entries(_ids(40_000)), level)]
        chunks = sample * (LEVEL_DOWN_CHUNKS // len(sample) + 1)  # enough chunks for a confident average
        huge = ChunkRef("f" * 32, "a", "a", 1, MAX_BYTES + 10)  # one object that filled a chunk by bytes
        assert infer_level(chunks + [huge] * (len(chunks) // 5)) == level
    assert infer_level([c.ref for c in _cut(_entries(_ids(500)))]) == 0  # few chunks: always level 0


@pytest.mark.parametrize("seed", range(12))
def test_cutting_again_around_touched_objects_equals_cutting_the_whole_snapshot(seed: int) -> None:
    rng = random.Random(seed)
    level = rng.choice((0, 0, 1))
    ids = _ids(rng.choice((0, 1, 50, 3_000, 12_000)), seed=seed)
    old = [c.ref for c in _cut(_entries(ids), level)]
    body: dict[str, str] = {}
    current = set(ids)
    touched: set[str] = set()
    for _ in range(rng.choice((1, 5, 40, 400))):
        op = rng.random()
        if op < 0.4 and current:
            oid = rng.choice(sorted(current))
            body[oid] = f"v{rng.random()}"
        elif op < 0.7 and current:
            oid = rng.choice(sorted(current))
            current.discard(oid)
        else:
            oid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            current.add(oid)
        touched.add(oid)
    entries = _entries(sorted(current), body)

    def entries_after(after: str | None) -> list[tuple[str, bytes]]:
        return [e for e in entries if after is None or e[0] > after]

    fresh = [c.ref for c in _cut(entries, level)]
    assert list(recut(old, touched, entries_after, level)) == fresh


def test_cutting_again_reads_only_the_chunks_around_touched_objects() -> None:
    ids = _ids(20_000)
    old = [c.ref for c in _cut(_entries(ids))]
    touched = {ids[1_000], ids[10_000]}
    entries = _entries(ids, {oid: "changed" for oid in touched})
    read = 0

    def entries_after(after: str | None) -> Iterator[tuple[str, bytes]]:
        nonlocal read
        for entry in entries:
            if after is None or entry[0] > after:
                read += 1
                yield entry

    assert list(recut(old, touched, entries_after, 0)) == [c.ref for c in _cut(entries)]
    assert read <= 2 * MAX_OBJECTS, f"read {read} of {len(entries)} objects to cut again around 2 of them"
