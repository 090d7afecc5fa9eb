"""One MSAL cache shared through one blob: the mechanics under both the daemon and the library.

The daemon's :class:`~graphsync.tokencache.tenant.TenantTokenCache` and the library's
:class:`~graphsync.tokencache.BlobTokenCache` decide *when* to look at the blob and *when* to ask the identity
provider; this class is *how*: conditional re-reads merged into memory, conditional writes merged on conflict and
written back in the background while storage is away, the lease on the lock blob and the bounded wait for another
holder's token, and the envelope. One implementation, so both behave the same on the same blob.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msal

from graphsync.cache_envelope import CacheEnvelope, EnvelopeError, NewerFormat
from graphsync.storage import BlobContent, NotModified, StorageError, WriteConflict
from graphsync.tokencache.backoff import Backoff
from graphsync.tokencache.clocks import SYSTEM_CLOCKS, Clocks
from graphsync.tokencache.memory import MemoryTokens
from graphsync.tokencache.merge import AT
from graphsync.tokencache.store import CacheLease, CacheStore

log = logging.getLogger(__name__)

# MSAL's own rule (ClientApplication._acquire_token_silent_from_cache_and_possibly_refresh_it): an access token
# with under five minutes left counts as expired, and one past its refresh_on is due for a proactive refresh.
MSAL_EXPIRY_MARGIN = 300
MAX_WRITE_ATTEMPTS = 5
STORAGE_BACKOFF_INITIAL = 1.0
STORAGE_BACKOFF_MAX = 60.0

Entry = dict[str, Any]


def start_daemon_thread(target: Callable[[], None], name: str) -> None:
    """How background work runs by default: a daemon thread, so it never holds up shutdown."""
    threading.Thread(target=target, name=name, daemon=True).start()


@dataclass(frozen=True)
class Published:
    """Another holder of the lease published a usable token while we waited: use it."""

    entry: Entry


class HeldElsewhere:
    """The type of :data:`HELD_ELSEWHERE`: someone else is refreshing and the caller asked not to wait."""


HELD_ELSEWHERE: Final = HeldElsewhere()


class Turn:
    """This caller's turn to ask the identity provider, holding the fleet lease if it got one.

    ``release()`` gives the lease back (idempotent): after the new token is published, or when the attempt failed.
    """

    def __init__(self, lease: CacheLease | None) -> None:
        self._stack = contextlib.ExitStack()
        if lease is not None:
            self._stack.enter_context(lease)  # a BlobLease renews itself from here until released
        self.leased = lease is not None

    def release(self) -> None:
        self._stack.close()


Claim = Published | HeldElsewhere | Turn


class SharedCache:
    """The memory and the blob of one shared MSAL cache; thread-safe. ``lock`` guards every change to memory."""

    def __init__(
        self,
        *,
        cache: msal.SerializableTokenCache,
        store: CacheStore,
        blob_name: str,
        lock_name: str,
        envelope: CacheEnvelope,
        lease_seconds: int = 15,
        lock_wait_seconds: float = 20.0,
        clocks: Clocks = SYSTEM_CLOCKS,
        start_thread: Callable[[Callable[[], None], str], None] = start_daemon_thread,
        log_extra: Mapping[str, str] | None = None,
    ) -> None:
        self.memory = MemoryTokens(cache, wall=clocks.wall)
        self.lock = threading.RLock()
        self.blob_name = blob_name
        self.lock_name = lock_name
        self._store = store
        self._envelope = envelope
        self._lease_seconds = lease_seconds
        self.lock_wait = lock_wait_seconds
        self._clocks = clocks
        self._start_thread = start_thread
        self._extra = dict(log_extra or {})
        self._etag: str | None = None  # of the blob version merged into memory last
        self._pending_write = False  # memory holds a token the blob lacks
        self._blob_is_newer = False  # written by a newer graphsync: read it, never overwrite it
        self._write_back_running = False  # a background write-back is scheduled
        self._storage_down_since: float | None = None  # monotonic
        self._storage_backoff = Backoff(
            initial=STORAGE_BACKOFF_INITIAL,
            maximum=STORAGE_BACKOFF_MAX,
            monotonic=clocks.monotonic,
            jitter=0.2,
            uniform=clocks.uniform,
        )

    # -- reading --------------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Merge the blob into memory if it changed since we last saw it (one conditional GET)."""
        with self.lock:
            if not self._storage_backoff.ready():
                return
            try:
                content = self._store.read(self.blob_name, if_none_match=self._etag)
            except StorageError as exc:
                self._storage_failed(exc)
                return
            self._storage_answered()
            if isinstance(content, NotModified):
                return
            if content is None:
                self._etag = None
                self._pending_write = self.memory.has_tokens()
                return
            self._etag = content.etag
            remote = self._decode(content.data)
            if remote is not None:
                self._pending_write = self.memory.merge(remote)

    def _decode(self, data: bytes) -> dict[str, Any] | None:
        """The blob's cache state; ``None`` (logged) when it is unreadable or written by a newer graphsync."""
        try:
            remote = self._envelope.decode(data, self.blob_name)
        except NewerFormat as exc:
            if not self._blob_is_newer:
                log.warning(
                    "token cache blob %s/%s has %s; reading around it and not overwriting it until this "
                    "replica is upgraded",
                    self._store.container_name,
                    self.blob_name,
                    exc,
                    extra=self._extra,
                )
            self._blob_is_newer = True
            return None
        except EnvelopeError as exc:
            log.warning(
                "token cache blob %s/%s is unreadable: %s; using memory and the identity provider, "
                "and the next write replaces it",
                self._store.container_name,
                self.blob_name,
                exc,
                extra=self._extra,
            )
            self._pending_write = self.memory.has_tokens()
            return None
        self._blob_is_newer = False
        return remote

    def inspect(self) -> dict[str, Any]:
        """What the blob holds, for ``graphsync status``: age, token count and expiry — never a secret."""
        report: dict[str, Any] = {"blob": f"{self._store.container_name}/{self.blob_name}"}
        try:
            content = self._store.read(self.blob_name)
        except StorageError as exc:
            return report | {"problem": f"storage unavailable: {exc}"}
        if not isinstance(content, BlobContent):
            return report | {"problem": "no cache blob yet (written after the first token request)"}
        report["blob_age_seconds"] = round(self._clocks.wall() - content.last_modified.timestamp())
        try:
            state = self._envelope.decode(content.data, self.blob_name)
        except EnvelopeError as exc:
            return report | {"problem": f"unreadable: {exc}"}
        expiries = [int(entry["expires_on"]) for entry in (state.get(AT) or {}).values()]
        return report | {"tokens": len(expiries), "token_expires_on": max(expiries, default=None), "problem": None}

    # -- writing --------------------------------------------------------------------------------------------

    def publish(self) -> None:
        """Memory just got a token from the identity provider: write it for the fleet (now, or in the background)."""
        with self.lock:
            self._pending_write = True
            self._flush()

    def flush_if_pending(self) -> None:
        """Write what the blob lacks (say, a token it lost to a corruption) unless storage is backing off."""
        with self.lock:
            if self._pending_write and self._storage_backoff.ready():
                self._flush()

    def _flush(self) -> None:
        """Write memory to the blob conditionally; on conflict re-read, merge and try again (bounded).

        A write that cannot happen now is retried by a background thread once storage is due again, so other
        replicas get the token without any acquisition here waiting on storage.
        """
        self._write_or_give_up()
        if self._pending_write:
            self._schedule_flush()

    def _write_or_give_up(self) -> None:
        for attempt in range(MAX_WRITE_ATTEMPTS):
            if not self._storage_backoff.ready() or self._blob_is_newer:
                return
            state = self.memory.pruned_state()
            try:
                self._etag = self._store.write(
                    self.blob_name, self._envelope.encode(state, self.blob_name), if_match=self._etag
                )
            except WriteConflict:
                log.debug("write conflict on %s (attempt %d): re-reading and merging", self.blob_name, attempt + 1)
                self._clocks.sleep(self._clocks.uniform(0, 0.05 * 2**attempt))
                self.sync()
                if not self._pending_write:
                    return  # the blob already holds everything we have (perhaps our own timed-out write)
                continue
            except StorageError as exc:
                self._storage_failed(exc)
                return
            self._storage_answered()
            self._pending_write = False
            return
        log.warning(
            "gave up writing %s after %d conflicting writes; will try again later",
            self.blob_name,
            MAX_WRITE_ATTEMPTS,
            extra=self._extra,
        )
        self._storage_backoff.failed()

    def _schedule_flush(self) -> None:
        if not self._write_back_running:
            self._write_back_running = True
            self._start_thread(self._write_back, f"token cache write-back {self.blob_name}")

    def _write_back(self) -> None:
        """The background write-back: once storage is due again, write what the blob lacks; until it lands."""
        while True:
            self._clocks.sleep(self._storage_backoff.remaining())
            with self.lock:
                if self._pending_write and not self._blob_is_newer:
                    self._write_or_give_up()
                if not self._pending_write or self._blob_is_newer:
                    self._write_back_running = False
                    return

    def _storage_failed(self, exc: StorageError) -> None:
        if self._storage_down_since is None:
            self._storage_down_since = self._clocks.monotonic()
            log.warning(
                "token cache storage unavailable for %s (%s); using memory and the identity provider until it answers",
                self.blob_name,
                exc,
                extra=self._extra,
            )
        else:
            log.debug("token cache storage still unavailable: %s", exc)
        self._storage_backoff.failed()

    def _storage_answered(self) -> None:
        if self._storage_down_since is not None:
            log.warning(
                "token cache storage answers again for %s after %.0f s",
                self.blob_name,
                self._clocks.monotonic() - self._storage_down_since,
                extra=self._extra,
            )
        self._storage_down_since = None
        self._storage_backoff.succeeded()

    # -- single flight across the fleet ---------------------------------------------------------------------

    def claim(self, find: Callable[[], Entry | None], *, give_way: bool) -> Claim:
        """Take the lock blob's lease to refresh, or wait up to ``lock_wait`` for the holder to publish.

        ``find`` says whether memory now holds a usable token. ``give_way``: the caller still has a working token,
        so when someone else holds the lease it gets :data:`HELD_ELSEWHERE` at once instead of waiting. A caller
        that waited in vain (or cannot reach storage) gets a :class:`Turn` without the lease: liveness beats thrift.
        """
        lease = self._try_lease()
        if lease is None and give_way and self._storage_backoff.ready():
            return HELD_ELSEWHERE
        deadline = self._clocks.monotonic() + self.lock_wait
        delay = 0.25
        while lease is None and self._storage_backoff.ready() and self._clocks.monotonic() < deadline:
            self._clocks.sleep(self._clocks.uniform(delay / 2, delay))
            delay = min(delay * 1.5, 2.0)  # poll often at first, then gently: many replicas may be waiting
            self.sync()
            if entry := find():
                return Published(entry)
            lease = self._try_lease()
        if lease is None and self._storage_backoff.ready():
            log.warning(
                "another process held %s for %.0f s without publishing a token; asking the identity provider directly",
                self.lock_name,
                self.lock_wait,
                extra=self._extra,
            )
        turn = Turn(lease)
        if turn.leased:
            self.sync()  # the previous holder may have published just before we got the lease
            if entry := find():
                turn.release()
                return Published(entry)
        return turn

    def _try_lease(self) -> CacheLease | None:
        if not self._storage_backoff.ready():
            return None
        try:
            return self._store.try_lease(self.lock_name, self._lease_seconds)
        except StorageError as exc:
            with self.lock:
                self._storage_failed(exc)
            return None
