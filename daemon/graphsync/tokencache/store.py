"""What the token cache needs from storage: conditional reads and writes of one blob, and a lease on another.

:class:`graphsync.storage.BlobStore` satisfies :class:`CacheStore` as it is (structurally, no inheritance), and so
does the in-memory store the unit tests use. Keeping the interface this small is what lets the cache's
single-flight, merge-on-conflict, backoff and outage logic be tested without Azurite.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, runtime_checkable

from graphsync.storage import BlobContent, NotModified


@runtime_checkable
class CacheLease(Protocol):
    """A lease held on a lock blob; leaving the ``with`` block gives it back (or lets it expire)."""

    def __enter__(self) -> CacheLease: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None: ...


@runtime_checkable
class CacheStore(Protocol):
    """Storage as the token cache sees it. Failures raise :class:`graphsync.storage.StorageError`."""

    @property
    def container_name(self) -> str:
        """For log lines and ``graphsync status``: where the blobs live."""
        ...

    def read(self, name: str, *, if_none_match: str | None = None) -> BlobContent | NotModified | None:
        """The blob with the ETag of this very download; :data:`~graphsync.storage.NOT_MODIFIED` when it still has
        ETag ``if_none_match``; ``None`` when it does not exist."""
        ...

    def write(self, name: str, data: bytes, *, if_match: str | None) -> str:
        """Write only if the blob still has ETag ``if_match`` (``None``: only if it does not exist); return the new
        ETag, or raise :class:`graphsync.storage.WriteConflict`."""
        ...

    def try_lease(self, name: str, seconds: int) -> CacheLease | None:
        """A lease on lock blob ``name``, or ``None`` while someone else holds one."""
        ...
