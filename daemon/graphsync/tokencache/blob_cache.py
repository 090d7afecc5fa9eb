"""``BlobTokenCache``: graphsync's fleet token cache for any MSAL Python confidential client.

Pass it as ``token_cache=`` to ``msal.ConfidentialClientApplication`` and every ``acquire_token_for_client`` of
every process pointing at the same blob shares its app tokens (see the README, "Use the fleet cache in your own
MSAL app"). It works through the two hooks MSAL calls during ``acquire_token_for_client`` (MSAL 1.29 and later):

- ``search`` for an access token: a hit in memory costs nothing; a miss re-reads the blob conditionally and, if
  the token is still missing, takes the fleet lease and lets this caller go to the identity provider — or, when
  another process or thread is already doing so, waits for its token (up to ``lock_wait``);
- ``add`` of the identity provider's answer: written to the blob (merged on conflict), then the lease is released.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import msal
from azure.storage.blob import BlobClient

from graphsync.cache_envelope import CacheEnvelope
from graphsync.storage import BlobStore
from graphsync.tokencache.clocks import SYSTEM_CLOCKS
from graphsync.tokencache.flights import Flight, Flights
from graphsync.tokencache.memory import Query
from graphsync.tokencache.merge import AT
from graphsync.tokencache.shared import (
    HELD_ELSEWHERE,
    MSAL_EXPIRY_MARGIN,
    Entry,
    SharedCache,
    Turn,
    start_daemon_thread,
)

log = logging.getLogger(__name__)

KEY_BYTES = 32  # AES-256-GCM, as the daemon's storage.encryption_key_file


def lock_blob_name(blob_name: str) -> str:
    """The lock blob beside a cache blob: ``.json`` replaced by ``.lock`` (the daemon's names), else ``.lock`` added."""
    return blob_name.removesuffix(".json") + ".lock"


class BlobTokenCache(msal.SerializableTokenCache):  # type: ignore[misc]  # msal ships no type information
    """An MSAL token cache shared through one blob by every process (and thread) that points at it.

    ``blob``: the cache blob, built with any credential; the lock blob beside it (:func:`lock_blob_name`) must be
    writable too, so a SAS must cover the container, not only the blob. Configure the client with short timeouts:
    storage is an optimisation here, never a dependency. ``encryption_key``: 32 bytes seal the blob with
    AES-256-GCM (``previous_encryption_keys`` still decrypt, for rotation). ``lock_wait``: how long a caller waits
    for another holder's token before asking the identity provider itself. ``lease_seconds``: the lock lease,
    renewed in the background while the identity provider answers.
    """

    def __init__(
        self,
        blob: BlobClient,
        *,
        encryption_key: bytes | None = None,
        previous_encryption_keys: Sequence[bytes] = (),
        lock_wait: float = 20.0,
        lease_seconds: int = 15,
    ) -> None:
        super().__init__()
        keys = [encryption_key] if encryption_key is not None else []
        if previous_encryption_keys and not keys:
            raise ValueError("previous_encryption_keys needs encryption_key, the key to write with")
        keys += previous_encryption_keys
        if any(len(key) != KEY_BYTES for key in keys):
            raise ValueError(f"an encryption key must be {KEY_BYTES} bytes (AES-256), e.g. os.urandom(32)")
        if not 15 <= lease_seconds <= 60:
            raise ValueError("lease_seconds must be between 15 and 60 (what Azure Storage allows)")
        # The lock blob goes through the cache blob's own container client: same credential, pipeline and retry
        # settings. azure-storage-blob offers it only as the private _get_container_client().
        store = BlobStore(blob._get_container_client(), count=_log_storage_call)
        self._shared = SharedCache(
            cache=self,
            store=store,
            blob_name=blob.blob_name,
            lock_name=lock_blob_name(blob.blob_name),
            envelope=CacheEnvelope(keys),
            lease_seconds=lease_seconds,
            lock_wait_seconds=lock_wait,
        )
        self._flights = Flights(bound=lock_wait, monotonic=SYSTEM_CLOCKS.monotonic)

    @property
    def blob_name(self) -> str:
        return self._shared.blob_name

    # -- MSAL's hooks ---------------------------------------------------------------------------------------

    def search(
        self, credential_type: str, target: list[str] | None = None, query: Query | None = None, **kwargs: Any
    ) -> Iterator[Entry]:
        """MSAL's lookup; for an app token (what ``acquire_token_for_client`` asks for) first the fleet's."""
        if credential_type == AT and target and query is not None and _is_app_token(query):
            entry = self._fleet_lookup(sorted(target), dict(query))
            if entry is not None:
                yield entry
                return
        yield from super().search(credential_type, target=target, query=query, **kwargs)

    def add(self, event: dict[str, Any], **kwargs: Any) -> None:
        """MSAL stores the identity provider's answer: publish it to the fleet, then end the refresh it answers."""
        with self._shared.lock:  # a merge from the blob must not replace memory while MSAL adds to it
            super().add(event, **kwargs)
        self._shared.publish()
        self._flights.check()

    # -- the fleet ------------------------------------------------------------------------------------------

    def _fleet_lookup(self, target: list[str], query: Query) -> Entry | None:
        """Make memory hold the token if the fleet has it, or make this caller the one that asks for it.

        Returns ``None`` to let MSAL search memory as usual (a hit, or a miss it takes to the identity provider),
        or a still-working token past its ``refresh_on`` without that field, so MSAL uses it instead of refreshing
        while another caller refreshes.
        """

        def usable() -> Entry | None:
            return self._shared.memory.find(MSAL_EXPIRY_MARGIN, honour_refresh_on=True, target=target, query=query)

        def working() -> Entry | None:
            return self._shared.memory.find(MSAL_EXPIRY_MARGIN, honour_refresh_on=False, target=target, query=query)

        if usable() is not None:
            return None  # the common case: no storage I/O while a token is valid in memory
        key = json.dumps([target, sorted(query.items())], default=str)
        flight = self._flights.board(key, landed=lambda: usable() is not None, working=lambda: working() is not None)
        if flight is None:
            return None if usable() is not None else _without_refresh_on(working())
        try:
            self._shared.sync()
            claim = None if usable() is not None else self._shared.claim(usable, give_way=working() is not None)
        except BaseException:
            self._flights.land(key, flight)
            raise
        if isinstance(claim, Turn):
            self._hold(key, flight, claim)
            return None  # MSAL asks the identity provider; add() ends the flight
        self._flights.land(key, flight)
        return _without_refresh_on(working()) if claim is HELD_ELSEWHERE else None

    def _hold(self, key: str, flight: Flight, turn: Turn) -> None:
        """Keep the turn until the token lands; a call that failed adds nothing, so the flight's bound ends it."""
        self._flights.hold(key, flight, turn)
        if turn.leased:  # a held lease renews itself: without this, a failed call would keep it forever

            def expire() -> None:
                SYSTEM_CLOCKS.sleep(max(0.0, flight.deadline - SYSTEM_CLOCKS.monotonic()))
                self._flights.expire(key, flight)

            start_daemon_thread(expire, f"token cache flight {self.blob_name}")


def _is_app_token(query: Query) -> bool:
    """MSAL's lookup for an app-only token: a client id and no account (user tokens are not the fleet's)."""
    return "client_id" in query and "home_account_id" in query and query["home_account_id"] is None


def _without_refresh_on(entry: Entry | None) -> Entry | None:
    """The token as MSAL should see it while someone else refreshes it: still good, not due for a refresh."""
    return None if entry is None else {k: v for k, v in entry.items() if k != "refresh_on"}


def _log_storage_call(operation: str, result: str) -> None:
    log.debug("token cache storage %s: %s", operation, result)
