"""One run of one job for one tenant: lock, fetch, apply, publish, then advance the cursor — in that order.

A run's data (snapshot and change file) is durable before its delta link is saved, so a crash or SIGTERM at any
point loses nothing: the next run starts again from the last saved link. Across replicas a lease on the job's
lock blob makes sure one replica runs it at a time, and the freshness check after taking the lease makes sure
the fleet runs it once per interval, not once per replica.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from graphsync.graph import GraphClient, GraphError, MalformedResponse, ResyncRequired
from graphsync.identity import TokenError
from graphsync.metrics import JOB_DURATION, JOB_LAST_SUCCESS, JOB_RUNS, OBJECTS_SYNCED
from graphsync.sinks import Sink
from graphsync.snapshot import MEMBERS_DELTA, SnapshotStore, encode
from graphsync.storage import BlobLease, BlobStore, StorageError, WriteConflict
from graphsync.timestamps import epoch, file_stamp, iso_utc

if TYPE_CHECKING:
    from graphsync.config import JobSettings

log = logging.getLogger(__name__)

RunStatus = Literal["ok", "failed", "skipped", "busy", "stopped"]
LOCK_SECONDS = 30
WAIT_POLL_SECONDS = 2.0


def replica_name() -> str:
    """How this process names itself in lock blobs and state files: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def lock_blob(tenant: str, job: str) -> str:
    return f"locks/{tenant}/{job}.lock"


@dataclass
class RunResult:
    tenant: str
    job: str
    status: RunStatus
    run_id: str | None = None
    objects: int = 0
    changes: int = 0
    pages: int = 0
    duration: float = 0.0
    full: bool = False
    resync: bool = False
    message: str = ""


Progress = Callable[[str, str, int, int], None]
"""Called after every page with (tenant, job, pages so far, records so far)."""


class RunInterrupted(Exception):
    """The run stopped between pages (shutdown, or the lock was lost); nothing of it was published."""


class JobRunner:
    def __init__(
        self,
        *,
        graph: GraphClient,
        sink: Sink,
        locks: BlobStore,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._graph = graph
        self._sink = sink
        self._locks = locks
        self.replica = replica or replica_name()
        self._clock = clock

    def run(
        self,
        job: JobSettings,
        tenant: str,
        *,
        due_after: float | None = None,
        wait: bool = False,
        stop: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> RunResult:
        """Run ``job`` for ``tenant`` unless another replica is running it (``busy``, or wait with ``wait``) or it
        already succeeded after ``due_after`` (``skipped``)."""
        stop = stop or threading.Event()
        try:
            lease = self._lock(job, tenant, wait, stop)
        except StorageError as exc:
            return self._finish(RunResult(tenant, job.name, "failed", message=f"cannot take the job lock: {exc}"))
        if lease is None:
            if stop.is_set():
                return RunResult(tenant, job.name, "stopped", message="stopped while waiting for the job lock")
            holder = self._holder(job, tenant)
            return RunResult(tenant, job.name, "busy", message=f"running on another replica ({holder})")
        with lease:  # renewed in the background; a lost lease stops the run before it publishes
            lease.announce(self.replica)
            return self._run_locked(job, tenant, due_after, lambda: stop.is_set() or lease.lost, progress)

    def _holder(self, job: JobSettings, tenant: str) -> str:
        try:
            return self._locks.lease_holder(lock_blob(tenant, job.name)) or "unknown"
        except StorageError:
            return "unknown"

    def _lock(self, job: JobSettings, tenant: str, wait: bool, stop: threading.Event) -> BlobLease | None:
        name = lock_blob(tenant, job.name)
        lease = self._locks.try_lease(name, LOCK_SECONDS)
        while lease is None and wait and not stop.wait(WAIT_POLL_SECONDS):
            lease = self._locks.try_lease(name, LOCK_SECONDS)
        return lease

    def _run_locked(
        self,
        job: JobSettings,
        tenant: str,
        due_after: float | None,
        interrupted: Callable[[], bool],
        progress: Progress | None,
    ) -> RunResult:
        try:
            state, etag = self._sink.read_state(tenant, job.name)
        except StorageError as exc:
            return self._finish(RunResult(tenant, job.name, "failed", message=str(exc)))
        state = state or {}
        last_started = state.get("last_success_started")
        if due_after is not None and last_started and epoch(last_started) >= due_after:
            return RunResult(tenant, job.name, "skipped", message=f"already ran at {last_started}")

        started = self._clock()
        result = RunResult(tenant, job.name, "ok", run_id=uuid.uuid4().hex[:12])
        log.info(
            "run %s of job %s for tenant %s started",
            result.run_id,
            job.name,
            tenant,
            extra={"tenant": tenant, "job": job.name, "run_id": result.run_id},
        )
        try:
            delta_link = self._sync(job, tenant, state, result, started, interrupted, progress)
        except RunInterrupted as exc:
            result.status, result.message = "stopped", str(exc)
            return self._finish(result, started)
        except WriteConflict:
            result.status = "failed"
            result.message = (
                "another replica published this job's snapshot during this run (lock lost?); this run published nothing"
            )
            return self._finish(result, started)
        except Exception as exc:  # any failure is the run's result, never the scheduler's problem
            if not isinstance(exc, (GraphError, StorageError, TokenError, OSError)):
                log.exception("unexpected failure in run %s of %s/%s", result.run_id, tenant, job.name)
            result.status, result.message = "failed", str(exc) or type(exc).__name__
            self._save_state(
                tenant,
                job,
                etag,
                state
                | {"last_failure": iso_utc(self._clock()), "last_error": result.message, "last_run_id": result.run_id},
            )
            return self._finish(result, started)
        saved = self._save_state(
            tenant,
            job,
            etag,
            state
            | {
                "job": job.name,
                "tenant": tenant,
                "query": _query(job),
                "delta_link": delta_link,
                "last_run_id": result.run_id,
                "last_success": iso_utc(self._clock()),
                "last_success_started": iso_utc(started),
                "objects": result.objects,
                "changes": result.changes,
                "replica": self.replica,
                "last_error": None,
            },
        )
        if not saved:  # the data is published and safe; the next run fetches these changes again
            result.status, result.message = "failed", "published, but the cursor (state.json) could not be saved"
        return self._finish(result, started)

    def _sync(
        self,
        job: JobSettings,
        tenant: str,
        state: dict[str, Any],
        result: RunResult,
        started: float,
        interrupted: Callable[[], bool],
        progress: Progress | None,
    ) -> str | None:
        """Fetch and apply; publish snapshot and change file; return the delta link to save."""
        delta_link = state.get("delta_link") if job.delta and state.get("query") == _query(job) else None
        version = self._sink.snapshot_version(tenant, job.name)  # publish only over this very snapshot
        if delta_link and version is None:
            log.warning("snapshot of %s/%s is missing; doing a full sync", tenant, job.name)
            delta_link = None
        with tempfile.TemporaryDirectory(prefix="graphsync-") as scratch:
            store = SnapshotStore(Path(scratch) / "work.sqlite")
            changes_path = Path(scratch) / "changes.jsonl"
            try:
                with open(changes_path, "wb") as changes:
                    if delta_link:
                        try:
                            store.load(self._sink.snapshot_lines(tenant, job.name))
                        except (ValueError, KeyError, TypeError, sqlite3.Error):
                            log.warning("snapshot of %s/%s is unreadable; doing a full sync", tenant, job.name)
                            delta_link = None
                            store.clear()
                    url = delta_link or self._graph.collection_url(job.resource, select=job.select, delta=job.delta)
                    result.full = delta_link is None
                    try:
                        new_link = self._fetch(tenant, job, url, store, changes, result, interrupted, progress)
                    except ResyncRequired as exc:
                        log.warning(
                            "delta token of %s/%s expired or invalid (%s); full resync",
                            tenant,
                            job.name,
                            exc.code,
                            extra={"tenant": tenant, "job": job.name},
                        )
                        result.full = result.resync = True
                        result.pages = result.changes = 0
                        store.clear()
                        changes.seek(0)
                        changes.truncate()
                        url = self._graph.collection_url(job.resource, select=job.select, delta=job.delta)
                        new_link = self._fetch(tenant, job, url, store, changes, result, interrupted, progress)
                if job.delta and new_link is None:
                    raise MalformedResponse(f"delta round of {job.resource} ended without an @odata.deltaLink")
                if interrupted():
                    raise RunInterrupted("stopped before publishing")
                result.objects = store.count()
                # The snapshot first, fenced: a replica that lost its lock fails here and publishes nothing.
                self._sink.write_snapshot(tenant, job.name, store.lines(), if_version=version)
                if result.changes or result.full:  # a full round says so even when it received nothing
                    name = f"{file_stamp(started)}-{result.run_id}{'-full' if result.full else ''}.jsonl"
                    self._sink.write_changes(tenant, job.name, name, _read_lines(changes_path))
            finally:
                store.close()
        return new_link

    def _fetch(
        self,
        tenant: str,
        job: JobSettings,
        url: str,
        store: SnapshotStore,
        changes: IO[bytes],
        result: RunResult,
        interrupted: Callable[[], bool],
        progress: Progress | None,
    ) -> str | None:
        """Stream pages into the working store and the change file; return the round's delta link."""
        for page in self._graph.pages(tenant, url, minimal=not result.full):
            for record in page.objects:
                _check_record(record, job.resource)
                changes.write(encode(_change(record)))
            store.apply(page.objects)
            result.pages += 1
            result.changes += len(page.objects)
            if progress:
                progress(tenant, job.name, result.pages, result.changes)
            if page.delta_link:
                return page.delta_link
            if interrupted():
                raise RunInterrupted("stopped between pages")
        return None

    def _save_state(self, tenant: str, job: JobSettings, etag: str | None, state: dict[str, Any]) -> bool:
        try:
            self._sink.write_state(tenant, job.name, state, if_match=etag)
        except WriteConflict:
            log.error(
                "state of %s/%s changed under this run (lock lost?); not saving this run's cursor",
                tenant,
                job.name,
                extra={"tenant": tenant, "job": job.name},
            )
            return False
        except (StorageError, OSError) as exc:
            log.error("cannot save state of %s/%s: %s", tenant, job.name, exc)
            return False
        return True

    def _finish(self, result: RunResult, started: float | None = None) -> RunResult:
        if started is not None:
            result.duration = self._clock() - started
            JOB_DURATION.labels(result.tenant, result.job).observe(result.duration)
        JOB_RUNS.labels(result.tenant, result.job, result.status).inc()
        extra = {"tenant": result.tenant, "job": result.job, "run_id": result.run_id}
        if result.status == "ok":
            OBJECTS_SYNCED.labels(result.tenant, result.job).inc(result.changes)
            JOB_LAST_SUCCESS.labels(result.tenant, result.job).set(self._clock())
            log.info(
                "run %s of %s/%s: %d objects, %d changes in %.1f s%s",
                result.run_id,
                result.tenant,
                result.job,
                result.objects,
                result.changes,
                result.duration,
                " (full resync)" if result.resync else "",
                extra=extra,
            )
        else:
            log.log(
                logging.ERROR if result.status == "failed" else logging.INFO,
                "run of %s/%s %s: %s",
                result.tenant,
                result.job,
                result.status,
                result.message,
                extra=extra,
            )
        return result


def _check_record(record: Any, resource: str) -> None:
    """What the working store relies on: a string id, and member changes that are objects with an id."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise MalformedResponse(f"a record in {resource} has no string 'id'")
    members = record.get(MEMBERS_DELTA, [])
    if not isinstance(members, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in members):
        raise MalformedResponse(f"record {record['id']} in {resource} has a malformed '{MEMBERS_DELTA}'")


def _change(record: dict[str, Any]) -> dict[str, Any]:
    """A change-file line: the record as Graph sent it, or for a removal just its id and reason."""
    if "@removed" in record:
        return {"id": record["id"], "@removed": record["@removed"]}
    return record


def _query(job: JobSettings) -> dict[str, Any]:
    """What the saved delta link was made for: a changed resource or $select needs a full sync."""
    return {"resource": job.resource, "select": sorted(job.select or []), "delta": job.delta}


def _read_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as file:
        yield from file
