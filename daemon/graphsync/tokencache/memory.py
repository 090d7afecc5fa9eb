"""This process's copy of one shared blob's tokens: an MSAL cache, plus the tokens a resource has refused."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import msal

from graphsync.tokencache.merge import AT, adds_to, merge_cache_states

# How long to remember a refused token that memory no longer holds (so its expiry is unknown).
UNKNOWN_REJECTED_LIFETIME = 24 * 3600


Query = dict[str, Any]
"""Which tokens a lookup wants: ``target`` scopes and the ``query`` fields MSAL matches (client_id, realm...)."""


class MemoryTokens:
    """The in-memory MSAL cache of one shared blob, read and merged on the injected wall clock.

    The daemon gives each (client id, tenant) partition a cache of its own, so client id and scopes are enough to
    match a token there; MSAL apps using :class:`~graphsync.tokencache.BlobTokenCache` look up with the query MSAL
    itself sends (environment, realm, client id).
    """

    def __init__(self, cache: msal.SerializableTokenCache, *, wall: Callable[[], float]) -> None:
        self.cache = cache
        self._wall = wall
        self._rejected: dict[str, float] = {}  # secrets a resource refused (401) -> their expiry

    def find(self, margin: int, *, honour_refresh_on: bool, target: list[str], query: Query) -> dict[str, Any] | None:
        """The longest-lived usable access token with more than ``margin`` seconds left, or ``None``."""
        now = self._wall()
        best = None
        for entry in self._search(now, target, query):
            if entry["secret"] in self._rejected or int(entry["expires_on"]) - now < margin:
                continue
            if honour_refresh_on and "refresh_on" in entry and int(entry["refresh_on"]) < now:
                continue
            if best is None or int(entry["expires_on"]) > int(best["expires_on"]):
                best = entry
        return best

    def expiry_of(self, secret: str) -> int | None:
        """The expiry MSAL stored for ``secret``, or ``None`` if memory does not hold it."""
        for entry in self._search(self._wall()):
            if entry["secret"] == secret:
                return int(entry["expires_on"])
        return None

    def reject(self, secret: str) -> None:
        """Remember a token a resource refused, for as long as it would live, and drop it from memory.

        Merges exclude it too: the blob may still hold it, or a replacement may expire in the same second.
        """
        now = self._wall()
        self._rejected = {s: exp for s, exp in self._rejected.items() if exp > now}
        for entry in list(self._search(now)):
            if entry["secret"] == secret:
                self._rejected[secret] = int(entry["expires_on"])
                self.cache.remove_at(entry)
        self._rejected.setdefault(secret, now + UNKNOWN_REJECTED_LIFETIME)

    def has_tokens(self) -> bool:
        return bool(self._state().get(AT))

    def merge(self, remote: dict[str, Any]) -> bool:
        """Merge a stored state into memory; whether memory now holds a token ``remote`` lacks (worth writing)."""
        merged = merge_cache_states(self._state(), remote, self._wall(), exclude=self._rejected)
        self.cache.deserialize(json.dumps(merged))
        return adds_to(merged, remote)

    def pruned_state(self) -> dict[str, Any]:
        """What to write: memory without expired or refused tokens."""
        return merge_cache_states(self._state(), {}, self._wall(), exclude=self._rejected)

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.cache.serialize())
        return state

    def _search(
        self, now: float, target: list[str] | None = None, query: Query | None = None
    ) -> Iterator[dict[str, Any]]:
        """Matching access tokens; MSAL prunes expired ones as it searches, by our clock, not its own.

        MSAL's own ``search``, called on the base class: the cache may be a ``BlobTokenCache``, whose ``search``
        is the fleet-wide lookup that calls this one.
        """
        tokens: Iterator[dict[str, Any]] = msal.TokenCache.search(self.cache, AT, target=target, query=query, now=now)
        return tokens
