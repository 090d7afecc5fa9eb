"""What the fleet keeps of each tenant's Graph subscriptions: one blob per tenant in the ``[storage]`` container.

``subscriptions/<tenant>.json`` holds, per delta job, the subscription's id, expiry and ``clientState``, and when the
tenant was last looked after (``maintained_at``): the replica that maintains a slot writes it, every replica reads
it to verify notifications. The blob sits beside the token cache rather than in the export's ``state.json``, which
whoever reads the export can read; with ``[storage] encryption_key_file`` configured, each ``clientState`` is sealed
with AES-256-GCM under that key (the blob name and job as associated data, so a value copied elsewhere fails).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from graphsync.cache_envelope import key_id
from graphsync.storage import BlobContent, BlobStore

FORMAT = "graphsync-subscriptions"
VERSION = 1


class RecordError(Exception):
    """The tenant's subscription blob cannot be read by this process; the message says why, never a secret."""


def record_blob(tenant: str) -> str:
    return f"subscriptions/{tenant}.json"


def lock_blob(tenant: str) -> str:
    """The lease that makes one replica at a time change the tenant's subscriptions (job names have no ``_``)."""
    return f"locks/{tenant}/_subscriptions.lock"


@dataclass
class Subscription:
    """One Graph subscription, as recorded. Times are Unix seconds."""

    id: str
    resource: str
    client_state: str = field(repr=False)
    expires: float
    notification_url: str
    lifecycle_url: str
    created: float
    renewed: float | None = None


@dataclass
class TenantRecord:
    """Everything kept of one tenant's subscriptions; ``etag`` is the version read (None: not stored yet)."""

    tenant: str
    subscriptions: dict[str, Subscription] = field(default_factory=dict)  # by job name
    maintained_at: float | None = None
    maintained_by: str | None = None
    errors: dict[str, str] = field(default_factory=dict)  # by job name: the last failure to create or renew
    etag: str | None = None


class SubscriptionRecords:
    """Reads and writes :class:`TenantRecord` blobs; ``keys`` (the storage encryption keys) seal clientStates."""

    def __init__(self, store: BlobStore, keys: list[bytes]) -> None:
        self._store = store
        self._ciphers = {key_id(key): AESGCM(key) for key in keys}
        self._primary = key_id(keys[0]) if keys else None

    def read(self, tenant: str) -> TenantRecord:
        """The tenant's record (empty if none is stored); StorageError or RecordError if it cannot be read."""
        name = record_blob(tenant)
        content = self._store.read(name)
        if not isinstance(content, BlobContent):
            return TenantRecord(tenant)
        try:
            document = json.loads(content.data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RecordError(f"{name} is not valid JSON") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != VERSION:
            raise RecordError(f"{name} is not a {FORMAT} version {VERSION} document")
        try:
            subscriptions = {
                job: Subscription(**(entry | {"client_state": self._open(entry["client_state"], name, job)}))
                for job, entry in document["subscriptions"].items()
            }
            return TenantRecord(
                tenant,
                subscriptions,
                document.get("maintained_at"),
                document.get("maintained_by"),
                dict(document.get("errors") or {}),
                content.etag,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise RecordError(f"{name} lacks a field or has one of the wrong type ({exc!s:.60})") from None

    def write(self, record: TenantRecord) -> None:
        """Store ``record`` if the blob is still the version it was read at (else WriteConflict); updates etag."""
        name = record_blob(record.tenant)
        document = {
            "format": FORMAT,
            "version": VERSION,
            "tenant": record.tenant,
            "maintained_at": record.maintained_at,
            "maintained_by": record.maintained_by,
            "errors": record.errors,
            "subscriptions": {
                job: asdict(sub) | {"client_state": self._seal(sub.client_state, name, job)}
                for job, sub in record.subscriptions.items()
            },
        }
        data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        record.etag = self._store.write(name, data, if_match=record.etag)

    def _seal(self, secret: str, name: str, job: str) -> dict[str, str]:
        if self._primary is None:
            return {"plain": secret}
        nonce = os.urandom(12)
        sealed = self._ciphers[self._primary].encrypt(nonce, secret.encode(), f"{name}#{job}".encode())
        return {
            "key_id": self._primary,
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(sealed).decode(),
        }

    def _open(self, sealed: Any, name: str, job: str) -> str:
        if not isinstance(sealed, dict):
            raise RecordError(f"{name}: the clientState of {job} is not a sealed or plain value")
        if "plain" in sealed:
            if self._primary is not None:
                raise RecordError(f"{name}: the clientState of {job} is stored unencrypted, but a key is configured")
            return str(sealed["plain"])
        cipher = self._ciphers.get(str(sealed.get("key_id")))
        if cipher is None:
            raise RecordError(f"{name}: the clientState of {job} is sealed with a key that is not configured")
        try:
            plain = cipher.decrypt(
                base64.b64decode(sealed["nonce"]), base64.b64decode(sealed["ciphertext"]), f"{name}#{job}".encode()
            )
        except (InvalidTag, ValueError, KeyError):
            raise RecordError(
                f"{name}: the clientState of {job} fails authentication (wrong key or tampered)"
            ) from None
        return plain.decode()
