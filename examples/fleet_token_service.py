"""A small service whose worker processes share one app token through graphsync's fleet token cache.

Each worker is what one pod of your service would be: its own ``msal.ConfidentialClientApplication`` calling
``acquire_token_for_client`` before each piece of work. With ``BlobTokenCache`` as its ``token_cache`` the workers
(and every other process pointing at the same blob, on any host) ask the identity provider about once per token
lifetime between them, instead of once per worker.

Configure it through the environment, then run ``python examples/fleet_token_service.py``:

    TENANT_ID, CLIENT_ID, CLIENT_SECRET     the app registration (client credentials)
    AZURE_STORAGE_CONNECTION_STRING         or AZURE_STORAGE_ACCOUNT_URL (then DefaultAzureCredential signs in)
    TOKEN_CACHE_CONTAINER                   default "graphsync"; the container must exist
    TOKEN_CACHE_BLOB                        default "token-cache/<CLIENT_ID>/<TENANT_ID>.json", where a graphsync
                                            daemon with the same client and tenant keeps its tokens
    TOKEN_CACHE_KEY                         optional: base64 of 32 bytes, to seal the blob with AES-256-GCM
    AUTHORITY_HOST                          default https://login.microsoftonline.com
    SCOPE                                   default https://graph.microsoft.com/.default
    WORKERS, SECONDS, INTERVAL              default 4 workers for 60 s, one token request a second each

Only the standard library, msal and graphsync (which brings azure-storage-blob) are used.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import time

import msal
from azure.storage.blob import BlobClient

from graphsync.tokencache import BlobTokenCache


def token_cache() -> BlobTokenCache:
    """The shared cache; the blob client gets short timeouts, since storage must never hold a token request up."""
    options = {"connection_timeout": 2, "read_timeout": 5, "retry_total": 1}
    container = os.environ.get("TOKEN_CACHE_CONTAINER", "graphsync")
    blob = os.environ.get(
        "TOKEN_CACHE_BLOB", f"token-cache/{os.environ['CLIENT_ID']}/{os.environ['TENANT_ID'].lower()}.json"
    )
    if connection_string := os.environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        client = BlobClient.from_connection_string(connection_string, container, blob, **options)
    else:
        from azure.identity import DefaultAzureCredential

        account = os.environ["AZURE_STORAGE_ACCOUNT_URL"]
        client = BlobClient(account, container, blob, credential=DefaultAzureCredential(), **options)
    key = os.environ.get("TOKEN_CACHE_KEY")
    return BlobTokenCache(client, encryption_key=base64.b64decode(key) if key else None)


def application() -> msal.ConfidentialClientApplication:
    host = os.environ.get("AUTHORITY_HOST", "https://login.microsoftonline.com").rstrip("/")
    microsoft = host.removeprefix("https://") in msal.authority.WELL_KNOWN_AUTHORITY_HOSTS
    return msal.ConfidentialClientApplication(
        os.environ["CLIENT_ID"],
        client_credential=os.environ["CLIENT_SECRET"],
        authority=f"{host}/{os.environ['TENANT_ID']}",
        token_cache=token_cache(),
        instance_discovery=None if microsoft else False,  # another host (a test double) is not Microsoft's
    )


def worker(number: int, seconds: float, interval: float) -> None:
    """One worker: a token before each piece of work (here, a log line instead of a call to the API)."""
    app = application()  # one per process: its constructor does network discovery
    scopes = [os.environ.get("SCOPE", "https://graph.microsoft.com/.default")]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        result = app.acquire_token_for_client(scopes)
        if "access_token" not in result:
            print(f"worker {number}: no token: {result.get('error')}: {result.get('error_description')}", flush=True)
        else:  # never log the token itself
            print(f"worker {number}: token from {result['token_source']}, {result['expires_in']} s left", flush=True)
        time.sleep(interval)


def main() -> None:
    workers = int(os.environ.get("WORKERS", "4"))
    seconds = float(os.environ.get("SECONDS", "60"))
    interval = float(os.environ.get("INTERVAL", "1"))
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as separate pods would be
    processes = [context.Process(target=worker, args=(n, seconds, interval)) for n in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    raise SystemExit(max(process.exitcode or 0 for process in processes))


if __name__ == "__main__":
    main()
