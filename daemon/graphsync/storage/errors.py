"""Storage failures as the rest of graphsync sees them: one exception for "storage did not answer usefully", one
for "someone else wrote first", each with a one-line cause that never holds a credential."""

from __future__ import annotations

from collections.abc import Callable

from azure.core.exceptions import AzureError, HttpResponseError

from graphsync.redaction import redact
from graphsync.text import first_line

Count = Callable[[str, str], None]
"""Told ``(operation, result)`` after each storage call: ``("read", "not_modified")``, ``("lease", "lease_held")``..."""


def count_in_metrics(operation: str, result: str) -> None:
    """Count a storage call in graphsync's Prometheus metrics: what the daemon's stores do.

    Imported on first use, so that the token-cache library (:class:`graphsync.tokencache.BlobTokenCache`), which
    passes a count of its own, never loads prometheus_client into an application that did not ask for it.
    """
    from graphsync.metrics import STORAGE_OPERATIONS

    STORAGE_OPERATIONS.labels(operation, result).inc()


class StorageError(Exception):
    """Storage did not answer usefully; the message names the blob and the cause, never a credential.

    ``status`` and ``code`` (e.g. 403 ``AuthorizationPermissionMismatch``) are set when the service answered,
    so callers can name the fix.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @classmethod
    def from_azure(cls, action: str, exc: AzureError) -> StorageError:
        status = getattr(exc, "status_code", None)
        return cls(f"{action}: {cause(exc)}", status=status, code=error_code(exc))


class WriteConflict(Exception):
    """Someone else wrote first: a failed ``If-Match`` (412) or a lost create race (409 or 412)."""


def error_code(exc: AzureError) -> str | None:
    """The service's error code (``ContainerNotFound``...): azure-storage sets it at run time, undeclared, and as
    a ``StorageErrorCode`` enum or a plain string."""
    code = getattr(exc, "error_code", None)
    return None if code is None else str(getattr(code, "value", code))


def cause(exc: AzureError) -> str:
    """A one-line cause for logs: status and error code when the service answered, else the transport error."""
    if isinstance(exc, HttpResponseError) and exc.status_code:
        code = error_code(exc) or (exc.reason or "").strip()
        return f"HTTP {exc.status_code} {code}".strip()
    return first_line(redact(f"{type(exc).__name__}: {str(exc.message or exc) or type(exc).__name__}"))
