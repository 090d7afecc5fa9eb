"""One tenant's token cache: memory first, the shared blob next, the identity provider last (single-flight).

See the package docstring for the order of sources, the conditional writes and how an outage is handled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msal

from graphsync import redaction
from graphsync.cache_envelope import CacheEnvelope
from graphsync.identity import TokenError, failure_result
from graphsync.metrics import IDENTITY_PROVIDER_REQUESTS, TOKEN_ACQUISITIONS
from graphsync.tokencache.backoff import Backoff
from graphsync.tokencache.clocks import SYSTEM_CLOCKS, Clocks
from graphsync.tokencache.shared import (
    MSAL_EXPIRY_MARGIN,
    Entry,
    Published,
    SharedCache,
    Turn,
    start_daemon_thread,
)
from graphsync.tokencache.store import CacheStore

log = logging.getLogger(__name__)

Source = Literal["memory", "blob", "identity_provider"]

# When the identity provider fails, a token with at least this much life left is still worth handing out.
FALLBACK_MARGIN = 30
IDENTITY_BACKOFF_INITIAL = 2.0
IDENTITY_BACKOFF_MAX = 60.0


@dataclass(frozen=True)
class AccessToken:
    token: str = field(repr=False)
    expires_on: int
    source: Source
    tenant: str


class TenantTokenCache:
    """One tenant's tokens: memory first, the shared blob next, the identity provider last (single-flight).

    The blob, its merges and the fleet lease are :class:`~graphsync.tokencache.shared.SharedCache`'s, as for the
    library's ``BlobTokenCache``; this class adds what the daemon needs on top: where a token came from, tokens a
    resource refused, a backoff for a failing identity provider, and the last working token as a fallback.
    """

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
        self._query = {"client_id": client_id}
        self._application_factory = application_factory
        self._clocks = clocks
        partition = f"{blob_prefix}/{client_id}/{tenant.lower()}"
        self._shared = SharedCache(
            cache=msal.SerializableTokenCache(),
            store=store,
            blob_name=f"{partition}.json",
            lock_name=f"{partition}.lock",
            envelope=envelope,
            lease_seconds=lease_seconds,
            lock_wait_seconds=lock_wait_seconds,
            clocks=clocks,
            start_thread=start_thread,
            log_extra={"tenant": tenant},
        )
        self._memory = self._shared.memory
        self._mutex = threading.Lock()  # single-flight inside this process
        self._application: msal.ConfidentialClientApplication | None = None
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
            if not rejected and (entry := self._find(FALLBACK_MARGIN, honour_refresh_on=False)):
                return self._hand_out(entry, "memory")
            self._mutex.acquire()
        try:
            if rejected:
                with self._shared.lock:
                    self._memory.reject(rejected)
            if entry := self._find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
                return self._hand_out(entry, "memory")
            self._shared.sync()
            if entry := self._find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True):
                self._shared.flush_if_pending()
                return self._hand_out(entry, "blob")
            return self._refresh()
        finally:
            self._mutex.release()

    def inspect_blob(self) -> dict[str, Any]:
        """What the shared blob holds, for ``graphsync status``: age, token count and expiry — never a secret."""
        return {"tenant": self.tenant} | self._shared.inspect()

    def _find(self, margin: int, *, honour_refresh_on: bool) -> Entry | None:
        return self._memory.find(margin, honour_refresh_on=honour_refresh_on, target=self._scopes, query=self._query)

    def _usable(self) -> Entry | None:
        return self._find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True)

    def _hand_out(self, entry: Entry, source: Source) -> AccessToken:
        return self._token(entry["secret"], int(entry["expires_on"]), source)

    def _token(self, secret: str, expires_on: int, source: Source) -> AccessToken:
        redaction.register_secret(secret)
        TOKEN_ACQUISITIONS.labels(self.tenant, source).inc()
        log.debug(
            "token for tenant %s from %s, expires %s", self.tenant, source, expires_on, extra={"tenant": self.tenant}
        )
        return AccessToken(secret, expires_on, source, self.tenant)

    # -- refresh --------------------------------------------------------------------------------------------

    def _refresh(self) -> AccessToken:
        """Single-flight across the fleet: hold the lock blob's lease, or use what the holder publishes.

        A replica that still has a working token (past refresh_on, or inside MSAL's five-minute margin) never
        waits: it keeps using it while another replica refreshes, or while the identity provider is backing off.
        """
        fallback = self._find(FALLBACK_MARGIN, honour_refresh_on=False)
        if not self._identity_backoff.ready():
            if fallback is not None:
                return self._hand_out(fallback, "memory")
            if self._last_error is not None:
                raise self._last_error  # backing off: the next attempt comes when the backoff ends
        claim = self._shared.claim(self._usable, give_way=fallback is not None)
        if isinstance(claim, Published):
            return self._hand_out(claim.entry, "blob")
        if isinstance(claim, Turn):
            try:
                return self._from_identity_provider(fallback)
            finally:
                claim.release()  # the lease renewed itself while the identity provider answered
        assert fallback is not None, "claim() gives way only to a caller with a working token"
        return self._hand_out(fallback, "memory")  # another replica holds the lease and is refreshing

    def _from_identity_provider(self, fallback: Entry | None) -> AccessToken:
        try:
            with self._shared.lock:  # MSAL adds the token to memory: no background merge may overwrite it meanwhile
                result = self._msal().acquire_token_for_client(self._scopes)
        except Exception as exc:  # whatever fails on the way (see failure_result) degrades; it never escapes here
            result = failure_result(exc)
        if "access_token" in result and result.get("token_source") == "identity_provider":
            IDENTITY_PROVIDER_REQUESTS.labels(self.tenant, "ok").inc()
            self._identity_backoff.succeeded()
            self._last_error = None
            self._shared.publish()
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
