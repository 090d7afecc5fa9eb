"""The fleet-shared MSAL token cache: one blob per (client id, tenant), merged on conflict, refreshed once.

Where a token comes from, cheapest first:

1. **memory** — this process's :class:`msal.SerializableTokenCache`; no storage I/O while a token is usable.
2. **blob** — a conditional re-read (``If-None-Match`` on the last seen ETag) of the partition blob, merged into
   memory; another replica may have refreshed already.
3. **identity provider** — under a short lease on a per-tenant lock blob, so that across the fleet one replica
   refreshes while the others poll the cache blob for its result. A replica that waited ``lock_wait_seconds``
   goes to the identity provider itself: liveness beats thrift.

Writes are conditional (``If-Match`` / ``If-None-Match: *``). A 412 or 409 means someone else wrote: re-read,
merge per entry (the later expiry wins, expired entries go), retry. Nobody's newer token is ever overwritten.

Storage is an optimisation, never a dependency: an outage, a corrupted blob or a wrong key is logged once and the
cache carries on from memory and the identity provider, writing the blob again once storage answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msal

from graphsync import redaction
from graphsync.cache_envelope import CacheEnvelope, EnvelopeError, NewerFormat
from graphsync.config import SecretCredential
from graphsync.identity import TRANSIENT_STATUSES, TokenError, build_application, failure_result, retrying_session
from graphsync.metrics import IDENTITY_PROVIDER_REQUESTS, TOKEN_ACQUISITIONS
from graphsync.storage import NOT_MODIFIED, BlobContent, BlobLease, BlobStore, StorageError, WriteConflict

if TYPE_CHECKING:
    from graphsync.config import Settings

log = logging.getLogger(__name__)

Source = Literal["memory", "blob", "identity_provider"]
AT = msal.TokenCache.CredentialType.ACCESS_TOKEN

# MSAL's own rule (ClientApplication._acquire_token_silent_from_cache_and_possibly_refresh_it): an access token
# with under five minutes left counts as expired, and one past its refresh_on is due for a proactive refresh.
MSAL_EXPIRY_MARGIN = 300
# When the identity provider fails, a token with at least this much life left is still worth handing out.
FALLBACK_MARGIN = 30
MAX_WRITE_ATTEMPTS = 5
STORAGE_BACKOFF_MAX = 60.0
IDENTITY_BACKOFF_MAX = 60.0


@dataclass(frozen=True)
class AccessToken:
    token: str = field(repr=False)
    expires_on: int
    source: Source
    tenant: str


def merge_cache_states(
    ours: dict[str, Any], theirs: dict[str, Any], now: float, *, exclude: Container[str] = ()
) -> dict[str, Any]:
    """Merge two serialized MSAL caches entry by entry; for access tokens the later expiry wins.

    Expired access tokens, and those whose secret is in ``exclude`` (rejected by a resource), are dropped, so
    merging with ``{}`` prunes. Ties are broken by a total order, so every replica picks the same entry and two
    replicas never take turns overwriting each other. Other sections (app metadata) are unions.
    """
    merged: dict[str, Any] = {}
    for section in ours.keys() | theirs.keys():
        mine, other = ours.get(section) or {}, theirs.get(section) or {}
        if not (isinstance(mine, dict) and isinstance(other, dict)):
            continue
        if section != AT:
            merged[section] = {**other, **mine}
            continue
        entries = {}
        for key in mine.keys() | other.keys():
            alive = [
                e
                for e in (mine.get(key), other.get(key))
                if e and int(e.get("expires_on", 0)) > now and e.get("secret") not in exclude
            ]
            if alive:
                entries[key] = max(
                    alive, key=lambda e: (int(e["expires_on"]), int(e.get("cached_at", 0)), e.get("secret", ""))
                )
        merged[section] = entries
    return merged


def _adds_to(merged: dict[str, Any], remote: dict[str, Any]) -> bool:
    """Whether ``merged`` holds an access token the remote state lacks (so writing it helps other replicas)."""
    remote_tokens = remote.get(AT) or {}
    return any(remote_tokens.get(key) != entry for key, entry in (merged.get(AT) or {}).items())


class TenantTokenCache:
    """One tenant's tokens: memory first, the shared blob next, the identity provider last (single-flight)."""

    def __init__(
        self,
        *,
        tenant: str,
        client_id: str,
        scopes: list[str],
        store: BlobStore,
        envelope: CacheEnvelope,
        application_factory: Callable[[msal.SerializableTokenCache], msal.ConfidentialClientApplication],
        blob_prefix: str = "token-cache",
        lease_seconds: int = 15,
        lock_wait_seconds: float = 20.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.tenant = tenant
        self._client_id = client_id
        self._scopes = list(scopes)
        self._store = store
        self._envelope = envelope
        self._application_factory = application_factory
        partition = f"{blob_prefix}/{client_id}/{tenant.lower()}"
        self.blob_name = f"{partition}.json"
        self.lock_name = f"{partition}.lock"
        self._lease_seconds = lease_seconds
        self._lock_wait = lock_wait_seconds
        self._clock = clock
        self._sleep = sleep

        self._mutex = threading.Lock()  # single-flight inside this process
        self._cache = msal.SerializableTokenCache()
        self._application: msal.ConfidentialClientApplication | None = None
        self._etag: str | None = None  # of the blob version merged into memory last
        self._pending_write = False  # memory holds a token the blob lacks
        self._rejected: dict[str, float] = {}  # secrets a resource refused (401) -> their expiry
        self._blob_is_newer = False  # written by a newer graphsync: read it, never overwrite it
        self._flusher: threading.Thread | None = None
        # Backoffs run on the monotonic clock: a wall-clock step must not stretch or skip them.
        self._storage_down_since: float | None = None
        self._storage_retry_at = 0.0
        self._storage_backoff = 1.0
        self._identity_retry_at = 0.0
        self._identity_backoff = 2.0
        self._last_error: TokenError | None = None

    # -- public ---------------------------------------------------------------------------------------------

    def acquire(self, *, rejected: str | None = None) -> AccessToken:
        """A token for the configured scopes. ``rejected``: a token the resource server refused (401); skip it.

        Never waits for storage or for another caller's refresh while a token that still works is in memory.
        """
        if not self._mutex.acquire(blocking=False):
            # Another thread of this process is refreshing: a token that still works beats waiting for it.
            if not rejected and (entry := self._find(FALLBACK_MARGIN, honour_refresh_on=False)):
                return self._hand_out(entry, "memory")
            self._mutex.acquire()
        try:
            if rejected:
                self._reject(rejected)
            if entry := self._find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
                return self._hand_out(entry, "memory")
            self._sync_from_blob()
            if entry := self._find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
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
        report["blob_age_seconds"] = round(self._clock() - content.last_modified.timestamp())
        try:
            state = self._envelope.decode(content.data, self.blob_name)
        except EnvelopeError as exc:
            return report | {"problem": f"unreadable: {exc}"}
        expiries = [int(entry["expires_on"]) for entry in (state.get(AT) or {}).values()]
        return report | {"tokens": len(expiries), "token_expires_on": max(expiries, default=None), "problem": None}

    # -- memory ---------------------------------------------------------------------------------------------

    def _find(self, margin: int, *, honour_refresh_on: bool) -> dict[str, Any] | None:
        """The longest-lived access token in memory with more than ``margin`` seconds left, or ``None``.

        The whole cache object belongs to this (client id, tenant) partition, so client id and scopes are
        enough to match: no need to know the realm GUID that discovery would map a domain tenant to.
        """
        now = self._clock()
        best = None
        for entry in self._cache.search(AT, target=self._scopes, query={"client_id": self._client_id}):
            if entry["secret"] in self._rejected or int(entry["expires_on"]) - now < margin:
                continue
            if honour_refresh_on and "refresh_on" in entry and int(entry["refresh_on"]) < now:
                continue
            if best is None or int(entry["expires_on"]) > int(best["expires_on"]):
                best = entry
        return best

    def _state(self) -> dict[str, Any]:
        return json.loads(self._cache.serialize())

    def _load(self, state: dict[str, Any]) -> None:
        self._cache.deserialize(json.dumps(state))

    def _reject(self, secret: str) -> None:
        """Remember a token a resource refused, for as long as it would live, and drop it from memory.

        Merges exclude it too: the blob may still hold it, or a replacement may expire in the same second.
        """
        now = self._clock()
        self._rejected = {s: exp for s, exp in self._rejected.items() if exp > now}
        for entry in list(self._cache.search(AT, target=self._scopes, query={"client_id": self._client_id})):
            if entry["secret"] == secret:
                self._rejected[secret] = int(entry["expires_on"])
                self._cache.remove_at(entry)
        self._rejected.setdefault(secret, now + 24 * 3600)

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
        if not self._storage_ready():
            return
        try:
            content = self._store.read(self.blob_name, if_none_match=self._etag)
        except StorageError as exc:
            self._storage_failed(exc)
            return
        self._storage_answered()
        if content is NOT_MODIFIED:
            return
        if content is None:
            self._etag = None
            self._pending_write = bool(self._state().get(AT))
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
            self._pending_write = bool(self._state().get(AT))
            return
        merged = merge_cache_states(self._state(), remote, self._clock(), exclude=self._rejected)
        self._load(merged)
        self._pending_write = _adds_to(merged, remote)

    def _flush_if_pending(self) -> None:
        if self._pending_write and self._storage_ready():
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
            if not self._storage_ready() or self._blob_is_newer:
                return
            state = merge_cache_states(self._state(), {}, self._clock(), exclude=self._rejected)  # prune
            try:
                self._etag = self._store.write(
                    self.blob_name, self._envelope.encode(state, self.blob_name), if_match=self._etag
                )
            except WriteConflict:
                log.debug("write conflict on %s (attempt %d): re-reading and merging", self.blob_name, attempt + 1)
                self._sleep(random.uniform(0, 0.05 * 2**attempt))
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
        self._back_off_storage()

    def _schedule_flush(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_later, name=f"token cache {self.tenant}", daemon=True)
            self._flusher.start()

    def _flush_later(self) -> None:
        while True:
            time.sleep(max(0.0, self._storage_retry_at - time.monotonic()))
            with self._mutex:
                if not self._pending_write or self._blob_is_newer:
                    return
                self._write_or_give_up()
                if not self._pending_write:
                    return

    def _storage_ready(self) -> bool:
        return time.monotonic() >= self._storage_retry_at

    def _storage_failed(self, exc: StorageError) -> None:
        if self._storage_down_since is None:
            self._storage_down_since = time.monotonic()
            log.warning(
                "token cache storage unavailable for %s (%s); using memory and the identity provider until it answers",
                self.blob_name,
                exc,
                extra={"tenant": self.tenant},
            )
        else:
            log.debug("token cache storage still unavailable: %s", exc)
        self._back_off_storage()

    def _back_off_storage(self) -> None:
        self._storage_retry_at = time.monotonic() + self._storage_backoff * random.uniform(0.8, 1.2)
        self._storage_backoff = min(self._storage_backoff * 2, STORAGE_BACKOFF_MAX)

    def _storage_answered(self) -> None:
        if self._storage_down_since is not None:
            log.warning(
                "token cache storage answers again for %s after %.0f s",
                self.blob_name,
                time.monotonic() - self._storage_down_since,
                extra={"tenant": self.tenant},
            )
        self._storage_down_since = None
        self._storage_backoff = 1.0

    # -- refresh --------------------------------------------------------------------------------------------

    def _refresh(self) -> AccessToken:
        """Single-flight across the fleet: hold the lock blob's lease, or use what the holder publishes.

        A replica that still has a working token (past refresh_on, or inside MSAL's five-minute margin) never
        waits: it keeps using it while another replica refreshes, or while the identity provider is backing off.
        """
        fallback = self._find(FALLBACK_MARGIN, honour_refresh_on=False)
        if time.monotonic() < self._identity_retry_at:
            if fallback is not None:
                return self._hand_out(fallback, "memory")
            if self._last_error is not None:
                raise self._last_error  # backing off: the next attempt comes when the backoff ends
        lease = self._try_lease()
        if lease is None and fallback is not None and self._storage_ready():
            return self._hand_out(fallback, "memory")  # another replica holds the lease and is refreshing
        deadline = time.monotonic() + self._lock_wait
        delay = 0.25
        while lease is None and self._storage_ready() and time.monotonic() < deadline:
            self._sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 1.5, 2.0)  # poll often at first, then gently: many replicas may be waiting
            self._sync_from_blob()
            if entry := self._find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
                return self._hand_out(entry, "blob")
            lease = self._try_lease()
        if lease is None and self._storage_ready():
            log.warning(
                "another replica held %s for %.0f s without publishing a token; asking the identity provider directly",
                self.lock_name,
                self._lock_wait,
                extra={"tenant": self.tenant},
            )
        with lease or contextlib.nullcontext():  # the lease renews itself while the identity provider answers
            if lease is not None:
                self._sync_from_blob()  # the previous holder may have published just before we got the lease
                if entry := self._find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
                    return self._hand_out(entry, "blob")
            return self._from_identity_provider(fallback)

    def _try_lease(self) -> BlobLease | None:
        if not self._storage_ready():
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
            self._identity_backoff = 2.0
            self._identity_retry_at = 0.0
            self._last_error = None
            self._pending_write = True
            self._flush()
            return self._token(result["access_token"], self._expiry_of(result), "identity_provider")
        IDENTITY_PROVIDER_REQUESTS.labels(self.tenant, "error").inc()
        self._identity_retry_at = time.monotonic() + self._identity_backoff  # from now: the call itself took time
        self._identity_backoff = min(self._identity_backoff * 2, IDENTITY_BACKOFF_MAX)
        if "access_token" in result:
            # MSAL answered from its cache: the proactive refresh (refresh_on passed) failed and MSAL quietly
            # kept the old token. Say so, or a dead credential stays hidden until the token expires.
            log.warning(
                "proactive token refresh for tenant %s failed; the current token stays in use until it expires",
                self.tenant,
                extra={"tenant": self.tenant},
            )
            return self._token(result["access_token"], self._expiry_of(result), "memory")
        error = TokenError(
            self.tenant, str(result.get("error")), result.get("error_description") or "", result.get("error_codes")
        )
        self._last_error = error
        if fallback is not None:
            log.warning("%s; using the cached token until it expires", error, extra={"tenant": self.tenant})
            return self._hand_out(fallback, "memory")
        raise error

    def _expiry_of(self, result: dict[str, Any]) -> int:
        """The expiry MSAL stored for the token it just returned, so every replica reports the same instant."""
        for entry in self._cache.search(AT, target=self._scopes, query={"client_id": self._client_id}):
            if entry["secret"] == result["access_token"]:
                return int(entry["expires_on"])
        return int(self._clock()) + int(result["expires_in"])

    def _msal(self) -> msal.ConfidentialClientApplication:
        """Built on first use and kept: a failed construction (discovery) is tried again next time, while a
        failed token request keeps the client and with it MSAL's own throttling state."""
        if self._application is None:
            self._application = self._application_factory(self._cache)
        return self._application


class TokenCaches:
    """Every configured tenant's :class:`TenantTokenCache`, built from settings; what the rest of graphsync uses."""

    def __init__(self, caches: dict[str, TenantTokenCache]) -> None:
        self._caches = caches

    @classmethod
    def from_settings(cls, settings: Settings, store: BlobStore) -> TokenCaches:
        identity = settings.identity
        if isinstance(credential := identity.credential, SecretCredential):
            redaction.register_secret(credential.client_secret.get_secret_value(), permanent=True)
        envelope = CacheEnvelope(settings.storage.encryption_keys)
        # A short Retry-After cap: a replica without a usable token waits in this call, and MSAL throttles too.
        http = retrying_session(total=3, statuses=TRANSIENT_STATUSES, retry_after_max=10)

        def factory_for(tenant: str) -> Callable[[msal.SerializableTokenCache], msal.ConfidentialClientApplication]:
            return lambda cache: build_application(identity, tenant, cache, http)

        return cls(
            {
                tenant: TenantTokenCache(
                    tenant=tenant,
                    client_id=identity.client_id,
                    scopes=identity.scopes,
                    store=store,
                    envelope=envelope,
                    application_factory=factory_for(tenant),
                    blob_prefix=settings.cache.prefix,
                    lease_seconds=settings.cache.lease_seconds,
                    lock_wait_seconds=settings.cache.lock_wait_seconds,
                )
                for tenant in identity.tenants
            }
        )

    @property
    def tenants(self) -> list[str]:
        return list(self._caches)

    def __getitem__(self, tenant: str) -> TenantTokenCache:
        return self._caches[tenant]

    def acquire(self, tenant: str, *, rejected: str | None = None) -> AccessToken:
        return self._caches[tenant].acquire(rejected=rejected)
