"""The published index of a snapshot's chunks is trusted only for exactly the block list it describes."""

from __future__ import annotations

import gzip
import json
import random
import uuid

import pytest

from graphsync.chunkindex import UnusableIndex, decode_index, encode_index
from graphsync.chunking import ChunkRef, chunk_lines


def _chunks(n: int, seed: int) -> list[ChunkRef]:
    rng = random.Random(seed)
    ids = sorted(str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n))
    return [chunk.ref for chunk in chunk_lines((oid, f'{{"id":"{oid}"}}\n'.encode()) for oid in ids)]


def _blocks(chunks: list[ChunkRef]) -> list[tuple[str, int]]:
    return [(chunk.block_id, chunk.size) for chunk in chunks]


def test_an_index_gives_back_the_chunks_of_the_blocks_it_was_written_for() -> None:
    chunks = _chunks(5000, seed=1)
    data = encode_index(chunks)
    assert decode_index(data, _blocks(chunks)) == chunks
    assert encode_index(list(chunks)) == data, "equal chunk lists give equal bytes (no timestamp in the gzip)"
    assert len(data) < 60 * len(chunks), f"{len(data)} bytes for {len(chunks)} chunks"


def test_an_index_is_refused_for_any_other_block_list() -> None:
    chunks = _chunks(3000, seed=2)
    data = encode_index(chunks)
    blocks = _blocks(chunks)
    changed = _chunks(3000, seed=3)[:1] + chunks[1:]  # one chunk replaced, as a publish after this index would
    for other in (blocks[:-1], blocks[1:] + blocks[:1], _blocks(changed), []):
        with pytest.raises(UnusableIndex, match="other blocks"):
            decode_index(data, other)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not gzip at all", "not gzipped JSON"),
        (gzip.compress(b"[1, 2"), "not gzipped JSON"),
        (gzip.compress(b"[]"), "not of format 1"),
        (gzip.compress(json.dumps({"format": 2}).encode()), "not of format 1"),
    ],
    # Named, not shown: gzip's header holds the time, so shown bytes would differ between xdist workers' collections.
    ids=["not gzip", "truncated JSON", "a list", "format 2"],
)
def test_a_damaged_index_is_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(UnusableIndex, match=reason):
        decode_index(data, _blocks(_chunks(100, seed=4)))


def test_an_index_whose_entries_do_not_fit_its_blocks_is_refused() -> None:
    chunks = _chunks(300, seed=5)
    body = json.loads(gzip.decompress(encode_index(chunks)))
    short = dict(body, chunks=body["chunks"][:-1])
    unordered = dict(body, chunks=[body["chunks"][1], body["chunks"][0], *body["chunks"][2:]])
    with pytest.raises(UnusableIndex, match="one entry per block"):
        decode_index(gzip.compress(json.dumps(short).encode()), _blocks(chunks))
    with pytest.raises(UnusableIndex, match="malformed or out of order"):
        decode_index(gzip.compress(json.dumps(unordered).encode()), _blocks(chunks))
