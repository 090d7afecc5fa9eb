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

Modules: :mod:`.tenant` (one tenant's cache and its single-flight refresh), :mod:`.memory` (the in-process MSAL
cache), :mod:`.merge` (merging two cache states), :mod:`.backoff`, :mod:`.clocks` (injected time),
:mod:`.store` (the storage interface it needs) and :mod:`.caches` (all tenants, built from settings).
"""

from graphsync.tokencache.backoff import Backoff
from graphsync.tokencache.caches import TokenCaches
from graphsync.tokencache.clocks import SYSTEM_CLOCKS, Clocks
from graphsync.tokencache.merge import AT, merge_cache_states
from graphsync.tokencache.store import CacheLease, CacheStore
from graphsync.tokencache.tenant import AccessToken, Source, TenantTokenCache

__all__ = [
    "AT",
    "SYSTEM_CLOCKS",
    "AccessToken",
    "Backoff",
    "CacheLease",
    "CacheStore",
    "Clocks",
    "Source",
    "TenantTokenCache",
    "TokenCaches",
    "merge_cache_states",
]
