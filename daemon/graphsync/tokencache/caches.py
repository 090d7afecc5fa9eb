"""Every configured tenant's token cache, built from settings: the one object the rest of graphsync talks to."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import msal

from graphsync import redaction
from graphsync.cache_envelope import CacheEnvelope
from graphsync.config import SecretCredential
from graphsync.identity import TRANSIENT_STATUSES, build_application, retrying_session
from graphsync.tokencache.store import CacheStore
from graphsync.tokencache.tenant import AccessToken, TenantTokenCache

if TYPE_CHECKING:
    from graphsync.config import Settings


class TokenCaches:
    """Every configured tenant's :class:`TenantTokenCache`, built from settings; what the rest of graphsync uses."""

    def __init__(self, caches: dict[str, TenantTokenCache]) -> None:
        self._caches = caches

    @classmethod
    def from_settings(cls, settings: Settings, store: CacheStore) -> TokenCaches:
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
