"""Where exports go: a local directory or a blob container, in the one layout other systems read.

    <tenant>/<job>/snapshot.jsonl                      current state, one object per line, sorted by id
    <tenant>/<job>/changes/<yyyymmddThhmmssZ>-<run id>[-full].jsonl   what one run received
    <tenant>/<job>/state.json                          delta link, last success / failure, counts

Every file is replaced atomically (directory: temp file + rename; blob: staged blocks + one commit), so a reader
never sees a half-written file. ``snapshot.jsonl`` and ``state.json`` are replaced only if they are still the
versions the run saw at its start: a replica that lost its lock (stalled, then resumed) can overwrite neither a
newer snapshot nor a newer cursor.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from graphsync.storage import BlobContent, BlobStore, WriteConflict

if TYPE_CHECKING:
    from graphsync.config import Settings

SNAPSHOT = "snapshot.jsonl"
STATE = "state.json"
CHANGES = "changes"
CHUNK_BYTES = 4 * 1024 * 1024


def sink_from_settings(settings: Settings) -> Sink:
    """The configured output: ``[output] container`` in the storage account, else ``[output] directory``."""
    if settings.output.container:
        return BlobSink(BlobStore.from_settings(settings.storage, container=settings.output.container))
    return DirectorySink(settings.output.directory)


class Sink(Protocol):
    """What a job run needs from its output, whichever the medium."""

    def describe(self) -> str: ...
    def read_state(self, tenant: str, job: str) -> tuple[dict[str, Any] | None, str | None]: ...
    def write_state(self, tenant: str, job: str, state: dict[str, Any], *, if_match: str | None) -> str: ...
    def snapshot_version(self, tenant: str, job: str) -> str | None: ...
    def snapshot_lines(self, tenant: str, job: str) -> Iterator[bytes]: ...
    def write_snapshot(self, tenant: str, job: str, lines: Iterable[bytes], *, if_version: str | None) -> None: ...
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
            stat = (self._dir(tenant, job) / SNAPSHOT).stat()
        except FileNotFoundError:
            return None
        return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"  # a rename always gives a new inode

    def snapshot_lines(self, tenant: str, job: str) -> Iterator[bytes]:
        with open(self._dir(tenant, job) / SNAPSHOT, "rb") as file:
            yield from file

    def write_snapshot(self, tenant: str, job: str, lines: Iterable[bytes], *, if_version: str | None) -> None:
        path = self._dir(tenant, job) / SNAPSHOT
        temp = _write_temp(path, lines)  # the slow part, outside the lock
        try:
            with self._locked(tenant, job):
                if self.snapshot_version(tenant, job) != if_version:
                    raise WriteConflict(f"{path} was replaced by another process during this run")
                _replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self, tenant: str, job: str) -> Iterator[None]:
        directory = self._dir(tenant, job)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".state.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def write_changes(self, tenant: str, job: str, name: str, lines: Iterable[bytes]) -> None:
        _atomic_write(self._dir(tenant, job) / CHANGES / name, lines)


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

    def read_state(self, tenant: str, job: str) -> tuple[dict[str, Any] | None, str | None]:
        content = self._store.read(f"{tenant}/{job}/{STATE}")
        if not isinstance(content, BlobContent):
            return None, None
        return _decode_state(content.data), content.etag

    def write_state(self, tenant: str, job: str, state: dict[str, Any], *, if_match: str | None) -> str:
        return self._store.write(f"{tenant}/{job}/{STATE}", _encode_state(state), if_match=if_match)

    def snapshot_version(self, tenant: str, job: str) -> str | None:
        return self._store.etag(f"{tenant}/{job}/{SNAPSHOT}")

    def snapshot_lines(self, tenant: str, job: str) -> Iterator[bytes]:
        pending = b""
        for chunk in self._store.read_chunks(f"{tenant}/{job}/{SNAPSHOT}"):
            *complete, pending = (pending + chunk).split(b"\n")
            for line in complete:
                yield line + b"\n"
        if pending:
            yield pending

    def write_snapshot(self, tenant: str, job: str, lines: Iterable[bytes], *, if_version: str | None) -> None:
        self._store.write_blocks(f"{tenant}/{job}/{SNAPSHOT}", _chunks(lines), fenced=True, if_match=if_version)

    def write_changes(self, tenant: str, job: str, name: str, lines: Iterable[bytes]) -> None:
        self._store.write_blocks(f"{tenant}/{job}/{CHANGES}/{name}", _chunks(lines))


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
