"""Where exports go: a local directory or a blob container, in the one layout other systems read.

    <tenant>/<job>/snapshot.jsonl                      current state, one object per line, sorted by id
    <tenant>/<job>/changes/<yyyymmddThhmmssZ>-<run id>[-full].jsonl   what one run received
    <tenant>/<job>/state.json                          delta link, last success / failure, counts
    <tenant>/<job>/snapshot.index.json.gz              (container only) each block's id range, for new hosts

Every file is replaced atomically (directory: temp file + rename; blob: staged blocks + one commit), so a reader
never sees a half-written file. In a container, ``snapshot.jsonl`` is a block blob whose blocks are the snapshot's
content-defined chunks (:mod:`graphsync.chunking`), each block ID a hash of its bytes: a new version stages only
the chunks that changed and names the others by ID, and a stale replica reads only the blocks it lacks. The
index beside it (:mod:`graphsync.chunkindex`) lets a host without a working store find the blocks holding given ids.

``snapshot.jsonl`` and ``state.json`` are replaced only if they are still the versions the run saw at its start:
a replica that lost its lock (stalled, then resumed) can overwrite neither a newer snapshot nor a newer cursor.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from graphsync.chunkindex import UnusableIndex, decode_index, encode_index
from graphsync.chunking import ChunkRef
from graphsync.storage import BlobContent, BlobStore, BlockList, StorageError, WriteConflict

if TYPE_CHECKING:
    from graphsync.config import Settings

log = logging.getLogger(__name__)

SNAPSHOT = "snapshot.jsonl"
SNAPSHOT_INDEX = "snapshot.index.json.gz"
STATE = "state.json"
CHANGES = "changes"
CHUNK_BYTES = 4 * 1024 * 1024


def sink_from_settings(settings: Settings) -> Sink:
    """The configured output: ``[output] container`` in the storage account, else ``[output] directory``."""
    if settings.output.directory is not None:  # the configuration fills it in when no container is set
        return DirectorySink(settings.output.directory)
    return BlobSink(BlobStore.from_settings(settings.storage, container=settings.output.container))


@dataclass(frozen=True)
class SnapshotBlocks:
    """A snapshot's committed blocks, and how to read a byte range of exactly that version."""

    listed: BlockList
    store: BlobStore
    name: str

    @property
    def version(self) -> str | None:
        return self.listed.etag

    @property
    def blocks(self) -> list[tuple[str, int]]:
        return self.listed.blocks

    @property
    def complete(self) -> bool:
        """Whether the blocks are the whole snapshot, of a known version (see :class:`BlockList`)."""
        return self.listed.complete

    def read(self, offset: int, length: int) -> bytes:
        assert self.listed.etag is not None, "read only the blocks of a known version"
        return self.store.read_range(self.name, offset, length, if_match=self.listed.etag)

    def read_index(self) -> tuple[list[ChunkRef], int]:
        """These blocks as chunks (with their id ranges) from the published index, and the index's size in bytes;
        :class:`UnusableIndex` unless the index describes exactly these blocks."""
        content = self.store.read(_index_name(self.name))
        if not isinstance(content, BlobContent):
            raise UnusableIndex("there is no index (a snapshot written by an older graphsync)")
        return decode_index(content.data, self.blocks), len(content.data)


class Sink(Protocol):
    """What a job run needs from its output, whichever the medium."""

    def describe(self) -> str: ...
    def location(self) -> str:
        """Where exactly the output is (absolute path, or container URL without credentials): names it in tags."""
        ...

    def read_state(self, tenant: str, job: str) -> tuple[dict[str, Any] | None, str | None]: ...
    def write_state(self, tenant: str, job: str, state: dict[str, Any], *, if_match: str | None) -> str: ...
    def snapshot_version(self, tenant: str, job: str) -> str | None: ...
    def snapshot_blocks(self, tenant: str, job: str) -> SnapshotBlocks | None:
        """The snapshot's blocks, where the medium keeps them (a container); ``None`` where it does not."""
        ...

    def snapshot_lines(self, tenant: str, job: str, *, version: str) -> Iterator[bytes]:
        """The whole snapshot, only if it is still ``version`` (else :class:`WriteConflict`)."""
        ...

    def write_snapshot(
        self,
        tenant: str,
        job: str,
        chunks: Sequence[ChunkRef],
        read: Callable[[ChunkRef], bytes],
        *,
        if_version: str | None,
        committed: Container[str],
    ) -> str:
        """Replace the snapshot by ``chunks`` if it is still ``if_version``; return the new version.

        ``read`` gives a chunk's bytes; it is called only for chunks the medium needs to upload: with blocks,
        those whose ID is not in ``committed`` (the block IDs the current version already holds).
        """
        ...

    def write_changes(self, tenant: str, job: str, name: str, lines: Iterable[bytes]) -> None: ...


def _encode_state(state: dict[str, Any]) -> bytes:
    return json.dumps(state, indent=2, sort_keys=True).encode() + b"\n"


def _decode_state(data: bytes) -> dict[str, Any] | None:
    """The state, or ``None`` when the file is not a JSON object (the run then starts over with a full sync)."""
    try:
        state = json.loads(data)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


class DirectorySink:
    """A local directory; several processes on one host coordinate ``state.json`` writes with ``flock``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def location(self) -> str:
        return str(self.root.resolve())

    def _dir(self, tenant: str, job: str) -> Path:
        return self.root / tenant / job

    def read_state(self, tenant: str, job: str) -> tuple[dict[str, Any] | None, str | None]:
        try:
            data = (self._dir(tenant, job) / STATE).read_bytes()
        except FileNotFoundError:
            return None, None
        return _decode_state(data), _etag(data)

    def write_state(self, tenant: str, job: str, state: dict[str, Any], *, if_match: str | None) -> str:
        data = _encode_state(state)
        with self._locked(tenant, job):  # compare-and-replace must be one step across processes
            _, current = self.read_state(tenant, job)
            if current != if_match:
                raise WriteConflict(f"{self._dir(tenant, job) / STATE} was changed by another process")
            _atomic_write(self._dir(tenant, job) / STATE, [data])
        return _etag(data)

    def snapshot_version(self, tenant: str, job: str) -> str | None:
        try:
            return _version((self._dir(tenant, job) / SNAPSHOT).stat())
        except FileNotFoundError:
            return None

    def snapshot_lines(self, tenant: str, job: str, *, version: str) -> Iterator[bytes]:
        path = self._dir(tenant, job) / SNAPSHOT
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed below; the version is checked on this very file
        except FileNotFoundError as exc:
            raise WriteConflict(f"{path} was removed during this run") from exc
        with file:
            if _version(os.fstat(file.fileno())) != version:
                raise WriteConflict(f"{path} was replaced by another process during this run")
            yield from file

    def snapshot_blocks(self, tenant: str, job: str) -> SnapshotBlocks | None:
        return None  # a local file has no blocks: reading it whole is cheap

    def write_snapshot(
        self,
        tenant: str,
        job: str,
        chunks: Sequence[ChunkRef],
        read: Callable[[ChunkRef], bytes],
        *,
        if_version: str | None,
        committed: Container[str],
    ) -> str:
        path = self._dir(tenant, job) / SNAPSHOT
        temp = _write_temp(path, map(read, chunks))  # the slow part, outside the lock
        try:
            with self._locked(tenant, job):
                if self.snapshot_version(tenant, job) != if_version:
                    raise WriteConflict(f"{path} was replaced by another process during this run")
                _replace(temp, path)
                version = self.snapshot_version(tenant, job)
        finally:
            temp.unlink(missing_ok=True)
        assert version is not None  # just renamed into place, under the lock
        return version

    @contextlib.contextmanager
    def _locked(self, tenant: str, job: str) -> Iterator[None]:
        directory = self._dir(tenant, job)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".state.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def write_changes(self, tenant: str, job: str, name: str, lines: Iterable[bytes]) -> None:
        _atomic_write(self._dir(tenant, job) / CHANGES / name, lines)


def _version(stat: os.stat_result) -> str:
    return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"  # a rename always gives a new inode


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _atomic_write(path: Path, lines: Iterable[bytes]) -> None:
    """Write to a hidden temp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    temp = _write_temp(path, lines)
    try:
        _replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _write_temp(path: Path, lines: Iterable[bytes]) -> Path:
    if not path.parent.exists():
        path.parent.mkdir(parents=True)
        _fsync_directory(path.parent.parent)  # a new directory must survive a crash too
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "wb") as file:
            file.writelines(lines)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _replace(temp: Path, path: Path) -> None:
    os.replace(temp, path)
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class BlobSink:
    """A blob container: the layout above as blob names."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store

    def describe(self) -> str:
        return f"blob container {self._store.container_name}"

    def location(self) -> str:
        return self._store.location

    def read_state(self, tenant: str, job: str) -> tuple[dict[str, Any] | None, str | None]:
        content = self._store.read(f"{tenant}/{job}/{STATE}")
        if not isinstance(content, BlobContent):
            return None, None
        return _decode_state(content.data), content.etag

    def write_state(self, tenant: str, job: str, state: dict[str, Any], *, if_match: str | None) -> str:
        return self._store.write(f"{tenant}/{job}/{STATE}", _encode_state(state), if_match=if_match)

    def snapshot_version(self, tenant: str, job: str) -> str | None:
        return self._store.etag(f"{tenant}/{job}/{SNAPSHOT}")

    def snapshot_lines(self, tenant: str, job: str, *, version: str) -> Iterator[bytes]:
        pending = b""
        for chunk in self._store.read_chunks(f"{tenant}/{job}/{SNAPSHOT}", if_match=version):
            *complete, pending = (pending + chunk).split(b"\n")
            for line in complete:
                yield line + b"\n"
        if pending:
            yield pending

    def snapshot_blocks(self, tenant: str, job: str) -> SnapshotBlocks | None:
        name = f"{tenant}/{job}/{SNAPSHOT}"
        listed = self._store.block_list(name)
        if listed is None:
            return None
        return SnapshotBlocks(listed, self._store, name)

    def write_snapshot(
        self,
        tenant: str,
        job: str,
        chunks: Sequence[ChunkRef],
        read: Callable[[ChunkRef], bytes],
        *,
        if_version: str | None,
        committed: Container[str],
    ) -> str:
        """Commit the blocks, then the index of the new version (see :meth:`_write_index`)."""
        name = f"{tenant}/{job}/{SNAPSHOT}"
        index_version = self._store.etag(_index_name(name))  # before the commit: see _write_index
        blocks = ((chunk.block_id, None if chunk.block_id in committed else read(chunk)) for chunk in chunks)
        version = self._store.write_blocks(name, blocks, fenced=True, if_match=if_version)
        self._write_index(name, chunks, index_version)
        return version

    def _write_index(self, name: str, chunks: Sequence[ChunkRef], if_match: str | None) -> None:
        """Replace the index by that of ``chunks``, only if it is still the version seen before the commit.

        A later publisher started after our commit (its own commit is fenced on our version), so it looked at the
        index after we did; once its write lands, the index is no longer the version we saw and ours fails its
        ``If-Match``: a late write never replaces a later publisher's index. (Ours landing between its look and its
        write makes *its* write fail instead: the index then lags, which readers detect.) A failure here does not
        fail the round (the snapshot is published): readers verify the index against the committed blocks and read
        the blocks as before until the next publish writes a matching one.
        """
        try:
            self._store.write(_index_name(name), encode_index(chunks), if_match=if_match)
        except WriteConflict:
            log.info("%s: a later publisher replaced the index; leaving theirs", name)
        except StorageError as exc:
            log.warning("%s: the snapshot is published but its index was not written (%s)", name, exc)

    def write_changes(self, tenant: str, job: str, name: str, lines: Iterable[bytes]) -> None:
        blocks = ((uuid.uuid4().hex, chunk) for chunk in _chunks(lines))
        self._store.write_blocks(f"{tenant}/{job}/{CHANGES}/{name}", blocks)


def _index_name(snapshot: str) -> str:
    return snapshot.removesuffix(SNAPSHOT) + SNAPSHOT_INDEX


def _chunks(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Group lines into blocks of about ``CHUNK_BYTES``: few round trips, bounded memory."""
    buffer: list[bytes] = []
    size = 0
    for line in lines:
        buffer.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)
