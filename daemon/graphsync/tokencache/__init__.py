"""The fleet-shared MSAL token cache: one blob per partition, merged on conflict, refreshed once per fleet.

Two front ends share one implementation (:class:`~graphsync.tokencache.shared.SharedCache`):

- :class:`BlobTokenCache`, the library: ``token_cache=`` of any ``msal.ConfidentialClientApplication``;
- ``TenantTokenCache`` / ``TokenCaches``, the daemon's, built from its settings.

Where a token comes from, cheapest first:

1. **memory** — this process's :class:`msal.SerializableTokenCache`; no storage I/O while a token is usable.
2. **blob** — a conditional re-read (``If-None-Match`` on the last seen ETag) of the cache blob, merged into
   memory; another process may have refreshed already.
3. **identity provider** — under a short lease on a lock blob beside the cache blob, so that across the fleet one
   process refreshes while the others poll the cache blob for its result (and inside a process, one thread while
   the others wait). A caller that waited ``lock_wait`` seconds goes to the identity provider itself: liveness
   beats thrift.

Writes are conditional (``If-Match`` / ``If-None-Match: *``). A 412 or 409 means someone else wrote: re-read,
merge per entry (the later expiry wins, expired entries go), retry. Nobody's newer token is ever overwritten.

Storage is an optimisation, never a dependency: an outage, a corrupted blob or a wrong key is logged once and the
cache carries on from memory and the identity provider, writing the blob again once storage answers.

Importing this package loads msal, azure-storage-blob and cryptography, not the daemon: the daemon's classes
(which need its settings, metrics and identity wiring) are imported on first use.

Modules: :mod:`.blob_cache` (the library class), :mod:`.flights` (single flight inside a process),
:mod:`.shared` (the blob, merges, write-back and lease), :mod:`.memory` (the in-process MSAL cache), :mod:`.merge`
(merging two cache states), :mod:`.backoff`, :mod:`.clocks` (injected time), :mod:`.store` (the storage interface
it needs); for the daemon :mod:`.tenant` (one tenant's cache) and :mod:`.caches` (all tenants, from settings).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from graphsync.tokencache.backoff import Backoff
from graphsync.tokencache.blob_cache import BlobTokenCache, lock_blob_name
from graphsync.tokencache.clocks import SYSTEM_CLOCKS, Clocks
from graphsync.tokencache.merge import AT, merge_cache_states
from graphsync.tokencache.store import CacheLease, CacheStore

if TYPE_CHECKING:
    from graphsync.tokencache.caches import TokenCaches
    from graphsync.tokencache.tenant import AccessToken, Source, TenantTokenCache

# The daemon's side, loaded when first named: it imports pydantic settings, Prometheus metrics and azure-identity.
_DAEMON_NAMES = {
    "AccessToken": "graphsync.tokencache.tenant",
    "Source": "graphsync.tokencache.tenant",
    "TenantTokenCache": "graphsync.tokencache.tenant",
    "TokenCaches": "graphsync.tokencache.caches",
}


def __getattr__(name: str) -> object:
    module = _DAEMON_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AT",
    "SYSTEM_CLOCKS",
    "AccessToken",
    "Backoff",
    "BlobTokenCache",
    "CacheLease",
    "CacheStore",
    "Clocks",
    "Source",
    "TenantTokenCache",
    "TokenCaches",
    "lock_blob_name",
    "merge_cache_states",
]
