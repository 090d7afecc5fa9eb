"""Merging two replicas' views of one MSAL cache, so a write conflict never loses anybody's newer token."""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import msal

AT = msal.TokenCache.CredentialType.ACCESS_TOKEN


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


def adds_to(merged: dict[str, Any], remote: dict[str, Any]) -> bool:
    """Whether ``merged`` holds an access token the remote state lacks (so writing it helps other replicas)."""
    remote_tokens = remote.get(AT) or {}
    return any(remote_tokens.get(key) != entry for key, entry in (merged.get(AT) or {}).items())
