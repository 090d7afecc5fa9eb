"""The published index of a snapshot's chunks: each block's first and last id and object count.

A host without a working store needs it to read only the chunks holding the objects a round touches: the block
list says where each block is (sizes), not which ids it holds. The index is small (about 50 bytes a chunk,
gzipped: ~70 kB for 100,000 users) and is written beside the snapshot after each publish.

It is never trusted on its own: it names the block list it describes by a SHA-256 of its block IDs (themselves
hashes of the chunks' bytes), and :func:`decode_index` accepts it only for exactly that committed list. An index
that lags the snapshot (a crash between the commit and its write, or a writer that lost the race) or that was
damaged is refused, and the reader reads the blocks as before.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from graphsync.chunking import ChunkRef

FORMAT = 1


class UnusableIndex(Exception):
    """The index is absent, damaged, or describes other blocks than the committed ones; the message says which."""


def blocks_digest(block_ids: Iterable[str]) -> str:
    """What names a block list: the SHA-256 of its block IDs in order."""
    return hashlib.sha256("\n".join(block_ids).encode()).hexdigest()


def encode_index(chunks: Sequence[ChunkRef]) -> bytes:
    """The index of ``chunks`` (a snapshot's chunks in order); gzip without a timestamp, so equal chunk lists give
    equal bytes."""
    body = {
        "format": FORMAT,
        "blocks": blocks_digest(chunk.block_id for chunk in chunks),
        "chunks": [[chunk.first_id, chunk.last_id, chunk.count] for chunk in chunks],
    }
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return gzip.compress(text.encode(), mtime=0)


def decode_index(data: bytes, blocks: Sequence[tuple[str, int]]) -> list[ChunkRef]:
    """The chunks of the committed ``blocks`` (``(id, size)`` in order) from ``data``, or :class:`UnusableIndex`."""
    try:
        body: Any = json.loads(gzip.decompress(data))
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise UnusableIndex(f"the index is not gzipped JSON ({exc})") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise UnusableIndex(f"the index is not of format {FORMAT}")
    if body.get("blocks") != blocks_digest(block for block, _ in blocks):
        raise UnusableIndex("the index describes other blocks than the committed ones")
    entries = body.get("chunks")
    if not isinstance(entries, list) or len(entries) != len(blocks):
        raise UnusableIndex("the index does not hold one entry per block")
    chunks = []
    previous = None
    for (block, size), entry in zip(blocks, entries, strict=True):
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
            and entry[2] > 0
            and (previous is None or previous < entry[0])
            and entry[0] <= entry[1]
        ):
            raise UnusableIndex(f"the index entry of block {block} is malformed or out of order")
        chunks.append(ChunkRef(block, entry[0], entry[1], entry[2], size))
        previous = entry[1]
    return chunks
