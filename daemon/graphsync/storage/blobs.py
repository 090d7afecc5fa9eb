"""A container seen through the few operations graphsync needs: conditional reads and writes, block lists,
ranged reads, and leases on lock blobs (see :mod:`graphsync.storage`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline import PipelineResponse
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    BlobLeaseClient,
    BlobServiceClient,
    ContainerClient,
    LinearRetry,
)

from graphsync.storage.errors import Count, StorageError, WriteConflict, count_in_metrics, error_code
from graphsync.storage.leases import BlobLease

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from graphsync.config import StorageSettings


class NotModified:
    """The type of :data:`NOT_MODIFIED` (a singleton), for annotations."""

    def __repr__(self) -> str:
        return "NOT_MODIFIED"


NOT_MODIFIED: Final = NotModified()
"""Returned by :meth:`BlobStore.read` when the blob still has the ETag the caller last saw."""


@dataclass(frozen=True)
class BlockList:
    """A block blob's committed blocks, ``(id, size)`` in order, with the ETag and size of the blob they describe.

    ``etag`` is ``None`` when the response had none: Azure sends it with Get Block List only if the blob has
    committed blocks. A blob written by one Put Blob (``upload_blob``, azcopy, a restore) has content but no
    committed blocks, so the blocks describe the blob only when their sizes add up to ``content_length``.
    """

    etag: str | None
    content_length: int
    blocks: list[tuple[str, int]]

    @property
    def complete(self) -> bool:
        """Whether the blocks are the whole blob, with the version they belong to."""
        return self.etag is not None and sum(size for _, size in self.blocks) == self.content_length


@dataclass(frozen=True)
class BlobContent:
    data: bytes
    etag: str
    last_modified: datetime


STAGE_CONCURRENCY = 8


class BlobStore:
    """One container, seen through the few operations graphsync needs."""

    def __init__(self, container: ContainerClient, *, count: Count = count_in_metrics) -> None:
        """``count`` is told each call's ``(operation, result)``; by default graphsync's Prometheus counter."""
        self._container = container
        self._count = count

    @classmethod
    def from_settings(cls, settings: StorageSettings, container: str | None = None) -> BlobStore:
        """Build a store with outage-friendly timeouts; ``container`` overrides the configured one."""
        options: dict[str, Any] = {
            "connection_timeout": min(settings.timeout_seconds, 5.0),
            "read_timeout": settings.timeout_seconds,
            "retry_policy": LinearRetry(backoff=1, retry_total=1, random_jitter_range=1),
        }
        if settings.connection_string is not None:
            service = BlobServiceClient.from_connection_string(settings.connection_string.get_secret_value(), **options)
        else:
            from azure.identity import DefaultAzureCredential

            assert settings.account_url is not None  # the configuration requires one of the two
            service = BlobServiceClient(settings.account_url, credential=DefaultAzureCredential(), **options)
        return cls(service.get_container_client(container or settings.container))

    @property
    def container_name(self) -> str:
        return self._container.container_name

    @property
    def location(self) -> str:
        """The container's URL without its query string (which may hold a SAS token)."""
        return urlsplit(self._container.url)._replace(query="", fragment="").geturl()

    def ensure_container(self) -> None:
        """Create the container unless it exists (a fresh account, or one an operator emptied)."""
        try:
            self._container.create_container()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise StorageError.from_azure(f"cannot create container {self.container_name}", exc) from exc

    def read(self, name: str, *, if_none_match: str | None = None) -> BlobContent | NotModified | None:
        """Download ``name``; with ``if_none_match`` the service answers 304 when nothing changed."""
        conditions: dict[str, Any] = (
            {"etag": if_none_match, "match_condition": MatchConditions.IfModified} if if_none_match else {}
        )
        try:
            downloader = self._container.download_blob(name, **conditions)
            data = downloader.readall()
        except ResourceNotFoundError:
            self._count("read", "absent")
            return None
        except AzureError as exc:
            if getattr(exc, "status_code", None) == 304:  # ResourceModifiedError when the service says why
                self._count("read", "not_modified")
                return NOT_MODIFIED
            raise self._failure("read", name, exc) from exc
        self._count("read", "ok")
        props = downloader.properties
        return BlobContent(data=data, etag=props.etag, last_modified=props.last_modified)

    def write(self, name: str, data: bytes, *, if_match: str | None) -> str:
        """Upload ``name`` only if it still has ETag ``if_match`` (``None``: only if it does not exist yet).

        Returns the new ETag. A missing container is created once, so an emptied account heals itself.
        """
        try:
            etag = self._conditional_upload(name, data, if_match)
        except ResourceNotFoundError as exc:
            if error_code(exc) != "ContainerNotFound":
                if if_match is not None:  # the blob we last saw was deleted: someone else changed it
                    raise self._conflict(name) from exc
                raise self._failure("write", name, exc) from exc
            self.ensure_container()
            try:
                etag = self._conditional_upload(name, data, if_match)
            except (ResourceModifiedError, ResourceExistsError) as conflict:
                raise self._conflict(name) from conflict
            except AzureError as retry_exc:
                raise self._failure("write", name, retry_exc) from retry_exc
        except (ResourceModifiedError, ResourceExistsError) as exc:
            raise self._conflict(name) from exc
        except AzureError as exc:
            raise self._failure("write", name, exc) from exc
        self._count("write", "ok")
        return etag

    def _conditional_upload(self, name: str, data: bytes, if_match: str | None) -> str:
        blob = self._container.get_blob_client(name)
        if if_match is None:
            # Create-only: If-None-Match: * (the SDK's overwrite=False). Never pass etag= with IfMissing.
            result = blob.upload_blob(data, overwrite=False)
        else:
            # overwrite=True is required with If-Match, or the SDK turns a 412 into ResourceExistsError.
            result = blob.upload_blob(
                data, overwrite=True, etag=if_match, match_condition=MatchConditions.IfNotModified
            )
        etag: str = result["etag"]
        return etag

    def _conflict(self, name: str) -> WriteConflict:
        self._count("write", "conflict")
        return WriteConflict(f"{self._path(name)} was changed by someone else")

    def _failure(self, operation: str, name: str, exc: AzureError) -> StorageError:
        """Count a failed ``operation`` (read, write, lease) and describe it for the caller's log line."""
        self._count(operation, "error")
        verb = {"read": "reading", "write": "writing", "lease": "leasing"}[operation]
        return StorageError.from_azure(f"{verb} {self._path(name)}", exc)

    def read_chunks(self, name: str, *, if_match: str | None = None) -> Iterator[bytes]:
        """Stream a (possibly large) blob; nothing when it does not exist. With ``if_match``, only that version:
        a blob replaced before or while it is read raises :class:`WriteConflict`."""
        conditions: dict[str, Any] = (
            {"etag": if_match, "match_condition": MatchConditions.IfNotModified} if if_match else {}
        )
        try:
            yield from self._container.download_blob(name, **conditions).chunks()
        except ResourceModifiedError as exc:
            raise WriteConflict(f"{self._path(name)} changed while it was being read") from exc
        except ResourceNotFoundError as exc:
            if if_match:
                raise WriteConflict(f"{self._path(name)} was deleted while it was being read") from exc
            return
        except AzureError as exc:
            raise StorageError.from_azure(f"reading {self._path(name)}", exc) from exc

    def etag(self, name: str) -> str | None:
        """The blob's current ETag, or ``None`` when it does not exist: a version to make a later write conditional."""
        try:
            return self._container.get_blob_client(name).get_blob_properties().etag
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise StorageError.from_azure(f"reading {self._path(name)}", exc) from exc

    def write_blocks(
        self,
        name: str,
        blocks: Iterable[tuple[str, bytes | None]],
        *,
        fenced: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Replace ``name`` atomically with the given blocks, in order: stage new ones, then commit the list.

        ``blocks`` are ``(block id, bytes)`` to stage, or ``(block id, None)`` for a block the blob already has
        committed (the list names it by ID; nothing is uploaded). Readers see the old blob until the commit and
        the whole new one after it, never a half-written file. Up to :data:`STAGE_CONCURRENCY` blocks are staged
        at once (each is a round trip; a round with a hundred changed chunks must not wait for them one by one),
        so memory holds that many blocks at most; ``blocks`` is consumed on this thread only.
        ``fenced``: commit only if the blob still has ETag ``if_match`` (``None``: only if it still does not
        exist), else :class:`WriteConflict`. Returns the new ETag.
        """
        blob = self._container.get_blob_client(name)
        try:
            block_list = []
            with ThreadPoolExecutor(STAGE_CONCURRENCY, thread_name_prefix="stage") as pool:
                staging: set[Future[None]] = set()
                for block_id, data in blocks:
                    if data is not None:
                        if len(staging) >= STAGE_CONCURRENCY:
                            finished, staging = wait(staging, return_when=FIRST_COMPLETED)
                            for future in finished:
                                future.result()  # the first failure stops the write
                        staging.add(pool.submit(self._stage, blob, block_id, data))
                    # LATEST: the block just staged if there is one, else the committed block of that ID.
                    block_list.append(BlobBlock(block_id))
                for future in staging:
                    future.result()
            if not fenced:
                result = blob.commit_block_list(block_list)
            elif if_match is None:
                result = blob.commit_block_list(block_list, match_condition=MatchConditions.IfMissing)
            else:
                result = blob.commit_block_list(
                    block_list, etag=if_match, match_condition=MatchConditions.IfNotModified
                )
        except (ResourceModifiedError, ResourceExistsError) as exc:
            raise self._conflict(name) from exc
        except AzureError as exc:
            raise self._failure("write", name, exc) from exc
        self._count("write", "ok")
        return str(result["etag"])

    def _stage(self, blob: BlobClient, block_id: str, data: bytes) -> None:
        try:
            blob.stage_block(block_id, data)
        except ResourceNotFoundError as exc:
            if error_code(exc) != "ContainerNotFound":
                raise
            self.ensure_container()  # a new output container, or one an operator emptied
            blob.stage_block(block_id, data)

    def block_list(self, name: str) -> BlockList | None:
        """The committed blocks of ``name``; ``None`` if absent.

        The ETag and size come from the Get Block List response itself, so they describe the same version.
        """
        responses: list[PipelineResponse[Any, Any]] = []

        try:
            committed, _ = self._container.get_blob_client(name).get_block_list(
                "committed", raw_response_hook=responses.append
            )
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise self._failure("read", name, exc) from exc
        self._count("read", "ok")
        headers = responses[-1].http_response.headers  # case-insensitive
        return BlockList(
            etag=headers.get("ETag") or None,
            content_length=int(headers.get("x-ms-blob-content-length") or 0),
            blocks=[(block.id, block.size) for block in committed],
        )

    def read_range(self, name: str, offset: int, length: int, *, if_match: str) -> bytes:
        """``length`` bytes of ``name`` from ``offset``, only from the version ``if_match`` (else WriteConflict)."""
        try:
            downloader = self._container.download_blob(
                name, offset=offset, length=length, etag=if_match, match_condition=MatchConditions.IfNotModified
            )
            data = downloader.readall()
        except (ResourceModifiedError, ResourceNotFoundError) as exc:
            raise WriteConflict(f"{self._path(name)} changed while it was being read") from exc
        except AzureError as exc:
            raise self._failure("read", name, exc) from exc
        self._count("read", "ok")
        return data

    def delete(self, name: str) -> None:
        """Delete ``name`` if it exists."""
        try:
            self._container.delete_blob(name)
        except ResourceNotFoundError:
            return
        except AzureError as exc:
            raise StorageError.from_azure(f"deleting {self._path(name)}", exc) from exc

    def lease_holder(self, name: str) -> str | None:
        """Who holds the lease on lock blob ``name`` (as they announced in its metadata), or ``None``."""
        try:
            props = self._container.get_blob_client(name).get_blob_properties()
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise StorageError.from_azure(f"reading {self._path(name)}", exc) from exc
        if props.lease.state != "leased":
            return None
        return (props.metadata or {}).get("holder", "unknown")

    def try_lease(self, name: str, seconds: int) -> BlobLease | None:
        """Take a lease on the lock blob ``name`` (created empty if missing); ``None`` if someone else holds it.

        Leases go on a separate lock blob, never on the data blob: a leased blob rejects writes without the lease
        id, and readers of the data must not depend on who holds the lock.
        """
        blob = self._container.get_blob_client(name)
        client = BlobLeaseClient(blob)
        for _ in range(2):
            try:
                client.acquire(lease_duration=seconds)
            except ResourceNotFoundError:
                self._create_lock_blob(name)
                continue
            except AzureError as exc:
                if getattr(exc, "status_code", None) == 409:  # LeaseAlreadyPresent (or ResourceExistsError)
                    self._count("lease", "lease_held")
                    return None
                raise self._failure("lease", name, exc) from exc
            self._count("lease", "ok")
            return BlobLease(client, blob, self._path(name), seconds, count=self._count)
        raise StorageError(f"leasing {self._path(name)}: the lock blob keeps disappearing")

    def _create_lock_blob(self, name: str) -> None:
        with contextlib.suppress(WriteConflict):  # another replica created it first: exactly what we wanted
            self.write(name, b"", if_match=None)

    def _path(self, name: str) -> str:
        return f"{self.container_name}/{name}"
