"""One tenant's token cache: memory first, the shared blob next, the identity provider last (single-flight).

See the package docstring for the order of sources, the conditional writes and how an outage is handled.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msal

from graphsync import redaction
from graphsync.cache_envelope import CacheEnvelope, EnvelopeError, NewerFormat
from graphsync.identity import TokenError, failure_result
from graphsync.metrics import IDENTITY_PROVIDER_REQUESTS, TOKEN_ACQUISITIONS
from graphsync.storage import BlobContent, NotModified, StorageError, WriteConflict
from graphsync.tokencache.backoff import Backoff
from graphsync.tokencache.clocks import SYSTEM_CLOCKS, Clocks
from graphsync.tokencache.memory import MemoryTokens
from graphsync.tokencache.merge import AT
from graphsync.tokencache.store import CacheLease, CacheStore

log = logging.getLogger(__name__)

Source = Literal["memory", "blob", "identity_provider"]

# MSAL's own rule (ClientApplication._acquire_token_silent_from_cache_and_possibly_refresh_it): an access token
# with under five minutes left counts as expired, and one past its refresh_on is due for a proactive refresh.
MSAL_EXPIRY_MARGIN = 300
# When the identity provider fails, a token with at least this much life left is still worth handing out.
FALLBACK_MARGIN = 30
MAX_WRITE_ATTEMPTS = 5
STORAGE_BACKOFF_INITIAL = 1.0
STORAGE_BACKOFF_MAX = 60.0
IDENTITY_BACKOFF_INITIAL = 2.0
IDENTITY_BACKOFF_MAX = 60.0


def start_daemon_thread(target: Callable[[], None], name: str) -> None:
    """How the background write-back runs by default: a daemon thread, so it never holds up shutdown."""
    threading.Thread(target=target, name=name, daemon=True).start()


@dataclass(frozen=True)
class AccessToken:
    token: str = field(repr=False)
    expires_on: int
    source: Source
    tenant: str


class TenantTokenCache:
    """One tenant's tokens: memory first, the shared blob next, the identity provider last (single-flight)."""

    def __init__(
        self,
        *,
        tenant: str,
        client_id: str,
        scopes: list[str],
        store: CacheStore,
        envelope: CacheEnvelope,
        application_factory: Callable[[msal.SerializableTokenCache], msal.ConfidentialClientApplication],
        blob_prefix: str = "token-cache",
        lease_seconds: int = 15,
        lock_wait_seconds: float = 20.0,
        clocks: Clocks = SYSTEM_CLOCKS,
        start_thread: Callable[[Callable[[], None], str], None] = start_daemon_thread,
    ) -> None:
        self.tenant = tenant
        self._scopes = list(scopes)
        self._store = store
        self._envelope = envelope
        self._application_factory = application_factory
        partition = f"{blob_prefix}/{client_id}/{tenant.lower()}"
        self.blob_name = f"{partition}.json"
        self.lock_name = f"{partition}.lock"
        self._lease_seconds = lease_seconds
        self._lock_wait = lock_wait_seconds
        self._clocks = clocks
        self._start_thread = start_thread

        self._mutex = threading.Lock()  # single-flight inside this process
        self._memory = MemoryTokens(client_id=client_id, scopes=scopes, wall=clocks.wall)
        self._application: msal.ConfidentialClientApplication | None = None
        self._etag: str | None = None  # of the blob version merged into memory last
        self._pending_write = False  # memory holds a token the blob lacks
        self._blob_is_newer = False  # written by a newer graphsync: read it, never overwrite it
        self._write_back_running = False  # a background write-back is scheduled (changed under the mutex)
        self._storage_down_since: float | None = None  # monotonic
        self._storage_backoff = Backoff(
            initial=STORAGE_BACKOFF_INITIAL,
            maximum=STORAGE_BACKOFF_MAX,
            monotonic=clocks.monotonic,
            jitter=0.2,
            uniform=clocks.uniform,
        )
        self._identity_backoff = Backoff(
            initial=IDENTITY_BACKOFF_INITIAL, maximum=IDENTITY_BACKOFF_MAX, monotonic=clocks.monotonic
        )
        self._last_error: TokenError | None = None

    # -- public ---------------------------------------------------------------------------------------------

    def acquire(self, *, rejected: str | None = None) -> AccessToken:
        """A token for the configured scopes. ``rejected``: a token the resource server refused (401); skip it.

        Never waits for storage or for another caller's refresh while a token that still works is in memory.
        """
        if not self._mutex.acquire(blocking=False):
            # Another thread of this process is refreshing: a token that still works beats waiting for it.
            if not rejected and (entry := self._memory.find(FALLBACK_MARGIN, honour_refresh_on=False)):
                return self._hand_out(entry, "memory")
            self._mutex.acquire()
        try:
            if rejected:
                self._memory.reject(rejected)
            if entry := self._memory.find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
                return self._hand_out(entry, "memory")
            self._sync_from_blob()
            if entry := self._memory.find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
                self._flush_if_pending()
                return self._hand_out(entry, "blob")
            return self._refresh()
        finally:
            self._mutex.release()

    def inspect_blob(self) -> dict[str, Any]:
        """What the shared blob holds, for ``graphsync status``: age, token count and expiry — never a secret."""
        report: dict[str, Any] = {"tenant": self.tenant, "blob": f"{self._store.container_name}/{self.blob_name}"}
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

    def _hand_out(self, entry: dict[str, Any], source: Source) -> AccessToken:
        return self._token(entry["secret"], int(entry["expires_on"]), source)

    def _token(self, secret: str, expires_on: int, source: Source) -> AccessToken:
        redaction.register_secret(secret)
        TOKEN_ACQUISITIONS.labels(self.tenant, source).inc()
        log.debug(
            "token for tenant %s from %s, expires %s", self.tenant, source, expires_on, extra={"tenant": self.tenant}
        )
        return AccessToken(secret, expires_on, source, self.tenant)

    # -- blob -----------------------------------------------------------------------------------------------

    def _sync_from_blob(self) -> None:
        """Merge the blob into memory if it changed since we last saw it (one conditional GET)."""
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
            self._pending_write = self._memory.has_tokens()
            return
        self._etag = content.etag
        try:
            remote = self._envelope.decode(content.data, self.blob_name)
            self._blob_is_newer = False
        except NewerFormat as exc:
            if not self._blob_is_newer:
                log.warning(
                    "token cache blob %s/%s has %s; reading around it and not overwriting it until this "
                    "replica is upgraded",
                    self._store.container_name,
                    self.blob_name,
                    exc,
                    extra={"tenant": self.tenant},
                )
            self._blob_is_newer = True
            return
        except EnvelopeError as exc:
            log.warning(
                "token cache blob %s/%s is unreadable: %s; using memory and the identity provider, "
                "and the next write replaces it",
                self._store.container_name,
                self.blob_name,
                exc,
                extra={"tenant": self.tenant},
            )
            self._pending_write = self._memory.has_tokens()
            return
        self._pending_write = self._memory.merge(remote)

    def _flush_if_pending(self) -> None:
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
            state = self._memory.pruned_state()
            try:
                self._etag = self._store.write(
                    self.blob_name, self._envelope.encode(state, self.blob_name), if_match=self._etag
                )
            except WriteConflict:
                log.debug("write conflict on %s (attempt %d): re-reading and merging", self.blob_name, attempt + 1)
                self._clocks.sleep(self._clocks.uniform(0, 0.05 * 2**attempt))
                self._sync_from_blob()
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
            extra={"tenant": self.tenant},
        )
        self._storage_backoff.failed()

    def _schedule_flush(self) -> None:
        if not self._write_back_running:
            self._write_back_running = True
            self._start_thread(self._write_back, f"token cache {self.tenant}")

    def _write_back(self) -> None:
        """The background write-back: once storage is due again, write what the blob lacks; until it lands."""
        while True:
            self._clocks.sleep(self._storage_backoff.remaining())
            with self._mutex:
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
                extra={"tenant": self.tenant},
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
                extra={"tenant": self.tenant},
            )
        self._storage_down_since = None
        self._storage_backoff.succeeded()

    # -- refresh --------------------------------------------------------------------------------------------

    def _refresh(self) -> AccessToken:
        """Single-flight across the fleet: hold the lock blob's lease, or use what the holder publishes.

        A replica that still has a working token (past refresh_on, or inside MSAL's five-minute margin) never
        waits: it keeps using it while another replica refreshes, or while the identity provider is backing off.
        """
        fallback = self._memory.find(FALLBACK_MARGIN, honour_refresh_on=False)
        if not self._identity_backoff.ready():
            if fallback is not None:
                return self._hand_out(fallback, "memory")
            if self._last_error is not None:
                raise self._last_error  # backing off: the next attempt comes when the backoff ends
        lease = self._try_lease()
        if lease is None and fallback is not None and self._storage_backoff.ready():
            return self._hand_out(fallback, "memory")  # another replica holds the lease and is refreshing
        deadline = self._clocks.monotonic() + self._lock_wait
        delay = 0.25
        while lease is None and self._storage_backoff.ready() and self._clocks.monotonic() < deadline:
            self._clocks.sleep(self._clocks.uniform(delay / 2, delay))
            delay = min(delay * 1.5, 2.0)  # poll often at first, then gently: many replicas may be waiting
            self._sync_from_blob()
            if entry := self._memory.find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
                return self._hand_out(entry, "blob")
            lease = self._try_lease()
        if lease is None and self._storage_backoff.ready():
            log.warning(
                "another replica held %s for %.0f s without publishing a token; asking the identity provider directly",
                self.lock_name,
                self._lock_wait,
                extra={"tenant": self.tenant},
            )
        with lease or contextlib.nullcontext():  # the lease renews itself while the identity provider answers
            if lease is not None:
                self._sync_from_blob()  # the previous holder may have published just before we got the lease
                if entry := self._memory.find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
                    return self._hand_out(entry, "blob")
            return self._from_identity_provider(fallback)

    def _try_lease(self) -> CacheLease | None:
        if not self._storage_backoff.ready():
            return None
        try:
            return self._store.try_lease(self.lock_name, self._lease_seconds)
        except StorageError as exc:
            self._storage_failed(exc)
            return None

    def _from_identity_provider(self, fallback: dict[str, Any] | None) -> AccessToken:
        try:
            result = self._msal().acquire_token_for_client(self._scopes)
        except Exception as exc:  # whatever fails on the way (see failure_result) degrades; it never escapes here
            result = failure_result(exc)
        if "access_token" in result and result.get("token_source") == "identity_provider":
            IDENTITY_PROVIDER_REQUESTS.labels(self.tenant, "ok").inc()
            self._identity_backoff.succeeded()
            self._last_error = None
            self._pending_write = True
            self._flush()
            return self._token(result["access_token"], self._expiry_of(result), "identity_provider")
        IDENTITY_PROVIDER_REQUESTS.labels(self.tenant, "error").inc()
        self._identity_backoff.failed()
        if "access_token" in result:
            # MSAL answered from its cache: the proactive refresh (refresh_on passed) failed and MSAL quietly
            # kept the old token. Say so, or a dead credential stays hidden until the token expires.
            log.warning(
                "proactive token refresh for tenant %s failed; the current token stays in use until it expires",
                self.tenant,
                extra={"tenant": self.tenant},
            )
            return self._token(result["access_token"], self._expiry_of(result), "memory")
        error = TokenError.from_result(self.tenant, result)
        self._last_error = error
        if fallback is not None:
            log.warning("%s; using the cached token until it expires", error, extra={"tenant": self.tenant})
            return self._hand_out(fallback, "memory")
        raise error

    def _expiry_of(self, result: dict[str, Any]) -> int:
        """The expiry MSAL stored for the token it just returned, so every replica reports the same instant."""
        stored = self._memory.expiry_of(result["access_token"])
        return stored if stored is not None else int(self._clocks.wall()) + int(result["expires_in"])

    def _msal(self) -> msal.ConfidentialClientApplication:
        """Built on first use and kept: a failed construction (discovery) is tried again next time, while a
        failed token request keeps the client and with it MSAL's own throttling state."""
        if self._application is None:
            self._application = self._application_factory(self._memory.cache)
        return self._application
