"""A plain MSAL confidential client whose only graphsync part is the token cache: one process of "your own app".

Run as ``python -m tests.msal_app --authority URL --container C --blob NAME --duration S --interval S``, with the
storage secrets in the environment (``STORAGE_CONNECTION_STRING``, optional ``CACHE_KEY`` as base64).
Each ``acquire_token_for_client`` prints one JSON line: time, MSAL's ``token_source``, the expiry and a short
fingerprint of the token (never the token), so tests can count identity-provider requests and tell whether
processes shared one token.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import time

import msal
from azure.storage.blob import BlobClient

from graphsync.tokencache import BlobTokenCache
from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET

SCOPES = ["https://graph.microsoft.com/.default"]


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def storage_client(connection_string: str, container: str, blob: str) -> BlobClient:
    """A blob client with the short timeouts the cache wants: storage must never hold a token request up long."""
    return BlobClient.from_connection_string(
        connection_string, container, blob, connection_timeout=2, read_timeout=5, retry_total=1
    )


def application(authority: str, cache: msal.TokenCache | None) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        CLIENT_ID,
        client_credential=CLIENT_SECRET,
        authority=authority,
        token_cache=cache,
        instance_discovery=False,  # the fake Entra is not a Microsoft host
        timeout=10,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--authority", required=True)
    parser.add_argument("--container", required=True)
    parser.add_argument("--blob", required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()
    key = os.environ.get("CACHE_KEY")
    cache = BlobTokenCache(
        storage_client(os.environ["STORAGE_CONNECTION_STRING"], args.container, args.blob),
        encryption_key=base64.b64decode(key) if key else None,
    )
    app = application(args.authority, cache)
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        result = app.acquire_token_for_client(SCOPES)
        if "access_token" not in result:
            raise SystemExit(f"no token: {result.get('error')}: {result.get('error_description')}")
        now = time.time()
        line = {
            "time": now,
            "source": result["token_source"],
            "expires_on": int(now) + int(result["expires_in"]),
            "token": fingerprint(result["access_token"]),
        }
        print(json.dumps(line), flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
