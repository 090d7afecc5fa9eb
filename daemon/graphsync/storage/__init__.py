"""Blob storage access: conditional reads and writes, block lists and ranged reads, and leases on lock blobs.

Everything above this module speaks in three outcomes instead of Azure SDK exceptions: a blob's content with the
ETag *from that very download* (never from a separate properties call, which could describe a later version),
:data:`NOT_MODIFIED`, or absent; a write that lands or raises :class:`WriteConflict`; and :class:`StorageError` for
everything that means "storage did not answer usefully" (outage, timeout, 5xx, permissions). Calls use short
timeouts and one quick retry, because the SDK's defaults can stall about a minute on an outage, and a token
request must not wait that long for a cache it can do without.
"""

from graphsync.storage.blobs import NOT_MODIFIED, BlobContent, BlobStore, BlockList, NotModified
from graphsync.storage.errors import StorageError, WriteConflict, error_code
from graphsync.storage.leases import BlobLease

__all__ = [
    "NOT_MODIFIED",
    "BlobContent",
    "BlobLease",
    "BlobStore",
    "BlockList",
    "NotModified",
    "StorageError",
    "WriteConflict",
    "error_code",
]
