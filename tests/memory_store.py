"""An in-memory :class:`graphsync.tokencache.CacheStore` with real ETag and lease semantics, for fast unit tests.

It behaves like :class:`graphsync.storage.BlobStore` where the token cache can tell: a read with ``If-None-Match``
on the current ETag is :data:`NOT_MODIFIED`; a write with ``If-Match`` lands only on that ETag, a create-only write
(``if_match=None``) only where no blob exists, and anything else is a :class:`WriteConflict`; a lease is refused
while another one is held and unexpired on the injected monotonic clock. On top, the test can take storage down,
let "another writer" land just before the next write (a real 412 race), put any bytes into a blob (a corrupt or
foreign one), and count the operations the cache made.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

from graphsync.storage import NOT_MODIFIED, BlobContent, NotModified, StorageError, WriteConflict


@dataclass(frozen=True)
class _Blob:
    data: bytes
    etag: str
    last_modified: datetime


class MemoryLease:
    """A lease on one lock blob of a :class:`MemoryStore`; leaving the ``with`` block releases it."""

    def __init__(self, store: MemoryStore, name: str, lease_id: int, expires_at: float) -> None:
        self._store = store
        self.name = name
        self.lease_id = lease_id
        self.expires_at = expires_at

    def __enter__(self) -> MemoryLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._store.release(self)


class MemoryStore:
    """Blobs in a dict. ``monotonic`` times lease expiry, ``wall`` dates ``last_modified``."""

    container_name = "memory"

    def __init__(self, *, monotonic: Callable[[], float], wall: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.RLock()
        self._blobs: dict[str, _Blob] = {}
        self._leases: dict[str, MemoryLease] = {}
        self._etags = itertools.count(1)
        self._lease_ids = itertools.count(1)
        self._before_next_write: Callable[[], None] | None = None
        self.down = False
        """While true every operation raises :class:`StorageError`, like an outage or a wrong key."""
        self.reads = self.writes = self.leases = 0
        """Operations attempted, including those that failed, conflicted or found nothing."""

    @property
    def operations(self) -> int:
        return self.reads + self.writes + self.leases

    # -- the CacheStore interface ---------------------------------------------------------------------------

    def read(self, name: str, *, if_none_match: str | None = None) -> BlobContent | NotModified | None:
        with self._lock:
            self.reads += 1
            self._check_up("reading", name)
            blob = self._blobs.get(name)
            if blob is None:
                return None
            if if_none_match is not None and if_none_match == blob.etag:
                return NOT_MODIFIED
            return BlobContent(data=blob.data, etag=blob.etag, last_modified=blob.last_modified)

    def write(self, name: str, data: bytes, *, if_match: str | None) -> str:
        with self._lock:
            self.writes += 1
            self._check_up("writing", name)
            if self._before_next_write is not None:
                other_writer, self._before_next_write = self._before_next_write, None
                other_writer()
            current = self._blobs.get(name)
            if (if_match is None and current is not None) or (
                if_match is not None and (current is None or current.etag != if_match)
            ):
                raise WriteConflict(f"{self.container_name}/{name} was changed by someone else")
            return self.put(name, data)

    def try_lease(self, name: str, seconds: int) -> MemoryLease | None:
        with self._lock:
            self.leases += 1
            self._check_up("leasing", name)
            now = self._monotonic()
            held = self._leases.get(name)
            if held is not None and held.expires_at > now:
                return None
            lease = MemoryLease(self, name, next(self._lease_ids), now + seconds)
            self._leases[name] = lease
            return lease

    # -- what tests do to it --------------------------------------------------------------------------------

    def put(self, name: str, data: bytes) -> str:
        """Write unconditionally (another replica, an operator, or a corruption) and return the new ETag."""
        with self._lock:
            etag = f'"0x{next(self._etags):X}"'
            self._blobs[name] = _Blob(data, etag, datetime.fromtimestamp(self._wall(), UTC))
            return etag

    def get(self, name: str) -> bytes | None:
        """The blob's bytes as stored, without counting a read."""
        with self._lock:
            blob = self._blobs.get(name)
            return None if blob is None else blob.data

    def before_next_write(self, other_writer: Callable[[], None]) -> None:
        """Run ``other_writer`` (typically a :meth:`put`) just before the next write's condition is checked."""
        self._before_next_write = other_writer

    def lease_holder(self, name: str) -> int | None:
        """The id of the unexpired lease on ``name``, if any."""
        with self._lock:
            held = self._leases.get(name)
            return held.lease_id if held is not None and held.expires_at > self._monotonic() else None

    def release(self, lease: MemoryLease) -> None:
        with self._lock:
            if self._leases.get(lease.name) is lease:
                del self._leases[lease.name]

    def _check_up(self, verb: str, name: str) -> None:
        if self.down:
            raise StorageError(f"{verb} {self.container_name}/{name}: storage is down (test)")
