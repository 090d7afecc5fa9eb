"""The pieces of the shared cache that need no network: merging, the blob envelope, redaction."""

from __future__ import annotations

import base64
import json
import os

import pytest

from graphsync import redaction
from graphsync.cache_envelope import CacheEnvelope, EnvelopeError
from graphsync.tokencache import merge_cache_states

NOW = 1_800_000_000


def _at(secret: str, expires_on: int, cached_at: int = NOW - 10) -> dict:
    return {
        "credential_type": "AccessToken",
        "secret": secret,
        "expires_on": str(expires_on),
        "cached_at": str(cached_at),
        "client_id": "c",
        "target": "s",
    }


def test_merge_keeps_the_later_expiry_per_entry_and_unions_the_rest():
    ours = {
        "AccessToken": {"k1": _at("old", NOW + 100), "k2": _at("only-ours", NOW + 50)},
        "AppMetadata": {"m": {"client_id": "c"}},
    }
    theirs = {"AccessToken": {"k1": _at("new", NOW + 3000), "k3": _at("only-theirs", NOW + 70)}}
    merged = merge_cache_states(ours, theirs, NOW)
    assert {k: v["secret"] for k, v in merged["AccessToken"].items()} == {
        "k1": "new",
        "k2": "only-ours",
        "k3": "only-theirs",
    }
    assert merged["AppMetadata"] == {"m": {"client_id": "c"}}
    # symmetric for access tokens: whoever merges, the newer token wins
    assert merge_cache_states(theirs, ours, NOW)["AccessToken"]["k1"]["secret"] == "new"


def test_merge_drops_expired_tokens_so_merging_with_nothing_prunes():
    state = {"AccessToken": {"dead": _at("x", NOW - 1), "live": _at("y", NOW + 1)}}
    assert list(merge_cache_states(state, {}, NOW)["AccessToken"]) == ["live"]


def test_envelope_round_trip_plain_and_encrypted():
    state = {"AccessToken": {"k": _at("secret-token-Qx7", NOW + 60)}}
    assert CacheEnvelope([]).decode(CacheEnvelope([]).encode(state, "a.json"), "a.json") == state
    key = os.urandom(32)
    sealed = CacheEnvelope([key]).encode(state, "a.json")
    assert b"secret-token-Qx7" not in sealed
    assert CacheEnvelope([key]).decode(sealed, "a.json") == state


def test_envelope_accepts_previous_keys_and_names_the_missing_one():
    old, new = os.urandom(32), os.urandom(32)
    sealed_with_old = CacheEnvelope([old]).encode({"AccessToken": {}}, "a.json")
    assert CacheEnvelope([new, old]).decode(sealed_with_old, "a.json") == {"AccessToken": {}}
    with pytest.raises(EnvelopeError, match="not among the configured keys"):
        CacheEnvelope([new]).decode(sealed_with_old, "a.json")
    with pytest.raises(EnvelopeError, match="no encryption key is configured"):
        CacheEnvelope([]).decode(sealed_with_old, "a.json")


def test_envelope_binds_ciphertext_to_its_blob_name():
    key = os.urandom(32)
    sealed = CacheEnvelope([key]).encode({"AccessToken": {}}, "tenant-a.json")
    with pytest.raises(EnvelopeError, match="authentication failed"):
        CacheEnvelope([key]).decode(sealed, "tenant-b.json")


def test_envelope_rejects_tampering_garbage_and_unknown_versions():
    key = os.urandom(32)
    envelope = json.loads(CacheEnvelope([key]).encode({"AccessToken": {}}, "a.json"))
    raw = bytearray(base64.b64decode(envelope["ciphertext"]))
    raw[0] ^= 1
    envelope["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(EnvelopeError, match="authentication failed"):
        CacheEnvelope([key]).decode(json.dumps(envelope).encode(), "a.json")
    with pytest.raises(EnvelopeError, match="not valid JSON"):
        CacheEnvelope([]).decode(b"\x00garbage{", "a.json")
    with pytest.raises(EnvelopeError, match="not a graphsync-token-cache blob"):
        CacheEnvelope([]).decode(b'{"AccessToken": {}}', "a.json")
    with pytest.raises(EnvelopeError, match="format version 2"):
        CacheEnvelope([]).decode(b'{"format": "graphsync-token-cache", "version": 2}', "a.json")
    with pytest.raises(EnvelopeError, match="stored unencrypted"):
        CacheEnvelope([key]).decode(CacheEnvelope([]).encode({}, "a.json"), "a.json")


def test_redaction_hides_registered_secrets_jwts_and_sas_signatures():
    redaction.register_secret("opaque-token-value-123")
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhYmNkZWYifQ.c2lnbmF0dXJlLXZhbHVl"
    text = f"Bearer opaque-token-value-123 then {jwt} and https://a/b?sv=1&sig=abc%2Fdef&se=2"
    out = redaction.redact(text)
    assert "opaque-token-value-123" not in out
    assert jwt not in out
    assert "abc%2Fdef" not in out
    assert "sv=1" in out and "se=2" in out


def test_merge_excludes_rejected_tokens_and_breaks_ties_the_same_way_on_every_replica():
    a, b = _at("token-a", NOW + 100), _at("token-b", NOW + 100)
    one = merge_cache_states({"AccessToken": {"k": a}}, {"AccessToken": {"k": b}}, NOW)
    other = merge_cache_states({"AccessToken": {"k": b}}, {"AccessToken": {"k": a}}, NOW)
    assert one == other
    rejected_b = merge_cache_states({"AccessToken": {"k": a}}, {"AccessToken": {"k": b}}, NOW, exclude={"token-b"})
    assert rejected_b["AccessToken"]["k"]["secret"] == "token-a"


def test_a_configured_secret_stays_redacted_after_any_number_of_tokens():
    redaction.register_secret("Qx8~client-secret-value.notAJwt", permanent=True)
    for i in range(2000):
        redaction.register_secret(f"token-number-{i:06d}")
    assert "Qx8~client-secret-value.notAJwt" not in redaction.redact("client_secret=Qx8~client-secret-value.notAJwt")


@pytest.mark.parametrize(
    "entry",
    [
        {"secret": "s", "expires_on": "soon"},
        {"expires_on": str(NOW + 60)},
        ["not", "an", "object"],
    ],
)
def test_envelope_rejects_malformed_token_entries_instead_of_passing_them_on(entry):
    envelope = json.dumps(
        {"format": "graphsync-token-cache", "version": 1, "cache": {"AccessToken": {"k": entry}}}
    ).encode()
    with pytest.raises(EnvelopeError, match="entr"):
        CacheEnvelope([]).decode(envelope, "a.json")
