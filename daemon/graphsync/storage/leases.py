"""Leases on lock blobs that renew themselves in the background until released, and say when they were lost."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from azure.core.exceptions import AzureError
from azure.storage.blob import BlobClient, BlobLeaseClient

from graphsync.storage.errors import Count

log = logging.getLogger(__name__)


class BlobLease:
    """A held lease. As a context manager it renews itself in the background until released.

    A renewal that fails (the lease expired and was taken, was broken, or storage went away) sets :attr:`lost`;
    work guarded by the lease checks it before publishing anything.
    """

    def __init__(self, client: BlobLeaseClient, blob: BlobClient, path: str, seconds: int, *, count: Count) -> None:
        self._client = client
        self._blob = blob
        self.path = path
        self._seconds = seconds
        self._count = count
        self._released = threading.Event()
        self.lost = False
        self._keeper = threading.Thread(target=self._keep_alive, name=f"lease {path}", daemon=True)

    def announce(self, holder: str) -> None:
        """Record who holds the lease in the lock blob's metadata, for ``graphsync status``; best effort."""
        with contextlib.suppress(AzureError):
            self._blob.set_blob_metadata({"holder": holder}, lease=self._client)

    def renew(self) -> bool:
        """Extend the lease; ``False`` when it was lost (expired and taken, or broken) or storage is unreachable."""
        try:
            self._client.renew()
        except AzureError:
            self._count("lease", "error")
            return False
        return True

    def release(self) -> None:
        """Give the lease back early so the next holder need not wait for it to expire; failures are harmless."""
        self._released.set()
        try:
            self._client.release()
        except AzureError:
            self._count("lease", "error")

    def _keep_alive(self) -> None:
        """Renew every third of the lease; one failed renewal is retried, the lease is lost only once it expired."""
        renewed = time.monotonic()
        interval = self._seconds / 3
        while not self._released.wait(interval):
            if self.renew():
                renewed, interval = time.monotonic(), self._seconds / 3
            elif time.monotonic() - renewed > self._seconds - 2:
                log.warning("lost the lease on %s: renewals failed until it expired", self.path)
                self.lost = True
                return
            else:
                interval = 1.0

    def __enter__(self) -> BlobLease:
        self._keeper.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
        self._keeper.join()
