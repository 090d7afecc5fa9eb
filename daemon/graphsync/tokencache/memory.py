"""This process's copy of one partition's tokens: an MSAL cache, plus the tokens a resource has refused."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import msal

from graphsync.tokencache.merge import AT, adds_to, merge_cache_states

# How long to remember a refused token that memory no longer holds (so its expiry is unknown).
UNKNOWN_REJECTED_LIFETIME = 24 * 3600


class MemoryTokens:
    """The in-memory MSAL cache of one (client id, tenant) partition, read and merged on the injected wall clock.

    The whole cache object belongs to the partition, so client id and scopes are enough to match a token: no need
    to know the realm GUID that discovery would map a domain tenant to.
    """

    def __init__(self, *, client_id: str, scopes: list[str], wall: Callable[[], float]) -> None:
        self.cache = msal.SerializableTokenCache()
        self._client_id = client_id
        self._scopes = list(scopes)
        self._wall = wall
        self._rejected: dict[str, float] = {}  # secrets a resource refused (401) -> their expiry

    def find(self, margin: int, *, honour_refresh_on: bool) -> dict[str, Any] | None:
        """The longest-lived usable access token with more than ``margin`` seconds left, or ``None``."""
        now = self._wall()
        best = None
        for entry in self._search(now):
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

    def _search(self, now: float) -> Iterator[dict[str, Any]]:
        """This partition's access tokens; MSAL prunes expired ones as it searches, by our clock, not its own."""
        tokens: Iterator[dict[str, Any]] = self.cache.search(
            AT, target=self._scopes, query={"client_id": self._client_id}, now=now
        )
        return tokens
