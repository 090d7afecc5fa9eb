"""The on-blob format of a token cache: a small versioned JSON envelope around MSAL's serialized cache.

With encryption keys configured the cache is sealed with AES-256-GCM. The blob name is the associated data, so a
blob copied under another tenant's name fails authentication instead of leaking tokens across partitions. The
envelope names the key by a short fingerprint so operators can rotate keys: the first key encrypts, every listed
key decrypts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT = "graphsync-token-cache"
VERSION = 1


class EnvelopeError(Exception):
    """The blob is not a cache this process can read; the message says why, in operator terms."""


class NewerFormat(EnvelopeError):
    """Written by a newer graphsync: readable by it, so not to be overwritten by this one (a rolling upgrade)."""


def key_id(key: bytes) -> str:
    """A fingerprint that identifies a key without revealing anything useful about it."""
    return hashlib.sha256(b"graphsync-key-id" + key).hexdigest()[:12]


class CacheEnvelope:
    """Encodes and decodes MSAL cache state (a dict) for one blob name."""

    def __init__(self, keys: list[bytes]) -> None:
        self._keys = {key_id(key): AESGCM(key) for key in keys}
        self._primary = key_id(keys[0]) if keys else None

    def encode(self, state: dict[str, Any], blob_name: str) -> bytes:
        plain = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        envelope: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        if self._primary is None:
            envelope["cache"] = state
        else:
            nonce = os.urandom(12)
            sealed = self._keys[self._primary].encrypt(nonce, plain, blob_name.encode())
            envelope |= {
                "key_id": self._primary,
                "nonce": base64.b64encode(nonce).decode(),
                "ciphertext": base64.b64encode(sealed).decode(),
            }
        return json.dumps(envelope, separators=(",", ":")).encode()

    def decode(self, data: bytes, blob_name: str) -> dict[str, Any]:
        try:
            envelope = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnvelopeError(f"not valid JSON ({exc.__class__.__name__} at byte {_position(exc)})") from None
        if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
            raise EnvelopeError(f"not a {FORMAT} blob")
        version = envelope.get("version")
        if isinstance(version, int) and version > VERSION:
            raise NewerFormat(f"format version {version}, newer than this graphsync's {VERSION}")
        if version != VERSION:
            raise EnvelopeError(f"format version {version!r}; this graphsync reads version {VERSION}")
        if "ciphertext" in envelope:
            state = self._decrypt(envelope, blob_name)
        elif self._primary is not None:
            raise EnvelopeError("stored unencrypted, but an encryption key is configured")
        else:
            state = envelope.get("cache")
        if not isinstance(state, dict):
            raise EnvelopeError("the envelope holds no cache object")
        _check_entries(state)
        return state

    def _decrypt(self, envelope: dict[str, Any], blob_name: str) -> Any:
        kid = envelope.get("key_id")
        if not isinstance(kid, str):
            raise EnvelopeError("an encrypted cache blob without a key_id")
        if not self._keys:
            raise EnvelopeError(f"encrypted with key {kid}, but no encryption key is configured")
        aead = self._keys.get(kid)
        if aead is None:
            raise EnvelopeError(f"encrypted with key {kid}, which is not among the configured keys")
        try:
            nonce = base64.b64decode(envelope["nonce"], validate=True)
            sealed = base64.b64decode(envelope["ciphertext"], validate=True)
            return json.loads(aead.decrypt(nonce, sealed, blob_name.encode()))
        except InvalidTag:
            raise EnvelopeError(
                f"authentication failed with key {kid} (tampered, or copied from another blob)"
            ) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise EnvelopeError(f"malformed encrypted envelope ({exc.__class__.__name__})") from None


def _check_entries(state: dict[str, Any]) -> None:
    """Reject what would break MSAL or the merge later: sections of non-objects, tokens without secret or expiry.

    Checked here so a malformed blob is treated like a corrupted one (logged, replaced) instead of raising out of
    a token request, or poisoning the in-memory cache it would be merged into.
    """
    for section, entries in state.items():
        if not isinstance(entries, dict) or not all(isinstance(entry, dict) for entry in entries.values()):
            raise EnvelopeError(f"section {section!r} is not a map of entries")
    for entry in (state.get("AccessToken") or {}).values():
        if not isinstance(entry.get("secret"), str) or not str(entry.get("expires_on", "")).isdigit():
            raise EnvelopeError("an access token entry lacks a secret or a numeric expires_on")


def _position(exc: Exception) -> int:
    position = getattr(exc, "pos", None) or getattr(exc, "start", 0)
    return position if isinstance(position, int) else 0
