"""One run of one job for one tenant: lock, run a round, then advance the cursor.

The round is a collection's (:mod:`graphsync.rounds`: full or delta, into the snapshot) or, for a job with
``cursor``, a log's (:mod:`graphsync.logrounds`: read by time, into change files only).

A run's data (snapshot and change file) is durable before its delta link is saved, so a crash or SIGTERM at any
point loses nothing: the next run starts again from the last saved link. Across replicas a lease on the job's
lock blob makes sure one replica runs it at a time, and the freshness check after taking the lease makes sure
the fleet runs it once per interval, not once per replica.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from graphsync.config.jobkinds import LICENCES
from graphsync.graph import GraphClient, GraphError, LicenceRequired
from graphsync.identity import TokenError
from graphsync.logrounds import LogRoundRunner
from graphsync.metrics import JOB_DURATION, JOB_LAST_SUCCESS, JOB_RUNS, OBJECTS_SYNCED, ROUNDS_WITH_CHANGES
from graphsync.reconcile import LAST_FULL_ROUND, export_reconciliation, reconciliation_due, report_drift
from graphsync.rounds import TABLES_HELD, Progress, Round, RoundRunner, RunInterrupted, saved_query
from graphsync.sinks import Sink
from graphsync.storage import BlobLease, BlobStore, StorageError, WriteConflict
from graphsync.tables import NO_TABLES, RoundTables
from graphsync.timestamps import epoch, file_stamp, iso_utc
from graphsync.workstore import WorkStores

if TYPE_CHECKING:
    from graphsync.config import JobSettings

log = logging.getLogger(__name__)

RunStatus = Literal["ok", "failed", "skipped", "busy", "stopped"]
LOCK_SECONDS = 30
WAIT_POLL_SECONDS = 2.0


def replica_name() -> str:
    """How this process names itself in lock blobs and state files: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _notified(state: dict[str, Any], notified: float | None) -> dict[str, str]:
    """``last_notification`` for state.json when this run served a newer change notification than it records.

    Kept here because a round that serves a notification writes state.json anyway: any replica (and ``graphsync
    status``) reads the time at no extra storage call, where a record of each replica's last notification would
    cost writes. A notification whose try found a later round already done elsewhere is not recorded: that
    round's own notifications are, so the time shown may be a little older than the newest notification.
    """
    if notified is None:
        return {}
    recorded = state.get("last_notification")
    if isinstance(recorded, str) and epoch(recorded) >= notified:
        return {}
    return {"last_notification": iso_utc(notified, timespec="milliseconds")}


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
    runner: str | None = None
    """The replica that ran the job (this one), holds its lease (busy) or served the slot (skipped), where known."""


class JobRunner:
    def __init__(
        self,
        *,
        graph: GraphClient,
        sink: Sink,
        locks: BlobStore,
        stores: WorkStores,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
        tables: RoundTables = NO_TABLES,
    ) -> None:
        self._sink = sink
        self._rounds = RoundRunner(graph=graph, sink=sink, stores=stores, tables=tables)
        self._log_rounds = LogRoundRunner(graph=graph, sink=sink, tables=tables)
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
        peek: bool = False,
        notified: float | None = None,
    ) -> RunResult:
        """Run ``job`` for ``tenant`` unless another replica is running it (``busy``, or wait with ``wait``) or it
        already succeeded after ``due_after`` (``skipped``).

        ``peek``: the caller expects another replica to have served the slot already (it ran the job last), so
        state.json is read first, without the lease: a served slot is then skipped for one storage call instead of
        taking, checking and releasing the lease. ``notified``: when the change notification that asked for this
        run came; a successful run records it as ``last_notification`` in state.json (see :func:`_notified`).
        """
        stop = stop or threading.Event()
        if stop.is_set():  # handed out as the stop came: start nothing, not even a lease
            return self._finish(RunResult(tenant, job.name, "stopped", message="stopped before it started"))
        if peek and due_after is not None:
            try:
                state, _ = self._sink.read_state(tenant, job.name)
            except StorageError:
                state = None  # the locked path reads it again and reports what is wrong
            _export_recorded(tenant, job.name, state or {})
            if (served := served_slot(job.name, tenant, state, due_after)) is not None:
                return self._finish(served)
        try:
            lease = self._lock(job, tenant, wait, stop)
        except StorageError as exc:
            return self._finish(RunResult(tenant, job.name, "failed", message=f"cannot take the job lock: {exc}"))
        if lease is None:
            if stop.is_set():
                return self._finish(
                    RunResult(tenant, job.name, "stopped", message="stopped while waiting for the job lock")
                )
            holder = self._holder(job, tenant)
            message = f"running on another replica ({holder or 'unknown'})"
            return self._finish(RunResult(tenant, job.name, "busy", message=message, runner=holder))
        with lease:  # renewed in the background; a lost lease stops the run before it publishes
            return self._run_locked(
                job, tenant, due_after, lease, lambda: stop.is_set() or lease.lost, progress, notified
            )

    def _holder(self, job: JobSettings, tenant: str) -> str | None:
        """Who holds the job's lease, as its lock blob's metadata names it; ``None`` when that cannot be read."""
        try:
            return self._locks.lease_holder(lock_blob(tenant, job.name))
        except StorageError:
            return None

    def _named(self, state: dict[str, Any]) -> bool:
        """Whether the lock blob's metadata names this replica: the last run recorded is this replica's success.

        A run that stopped without recording anything (a shutdown) may have renamed it since; a replica finding
        the job busy then reads that name until this run ends.
        """
        if state.get("replica") != self.replica or not state.get("last_success"):
            return False
        failed = state.get("last_failure")
        return failed is None or epoch(failed) <= epoch(state["last_success"])

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
        lease: BlobLease,
        interrupted: Callable[[], bool],
        progress: Progress | None,
        notified: float | None,
    ) -> RunResult:
        try:
            state, etag = self._sink.read_state(tenant, job.name)
        except StorageError as exc:
            return self._finish(RunResult(tenant, job.name, "failed", message=str(exc), runner=self.replica))
        _export_recorded(tenant, job.name, state or {})
        if due_after is not None and (served := served_slot(job.name, tenant, state, due_after)) is not None:
            return self._finish(served)
        state = state or {}
        if interrupted():  # stopped (or the lease lost) while taking the lease and reading the state
            return self._finish(RunResult(tenant, job.name, "stopped", message="stopped before it started"))
        # Named only now that it runs, and only when the lock blob does not name this replica already (it does when
        # the last run recorded is this replica's success): a check that skips, and the usual run of a pair by its
        # last runner, cost no metadata write.
        if not self._named(state):
            lease.announce(self.replica)

        started = self._clock()
        result = RunResult(tenant, job.name, "ok", run_id=uuid.uuid4().hex[:12], runner=self.replica)
        log.info(
            "run %s of job %s for tenant %s started",
            result.run_id,
            job.name,
            tenant,
            extra={"tenant": tenant, "job": job.name, "run_id": result.run_id},
        )

        def change_file(full: bool) -> str:
            return f"{file_stamp(started)}-{result.run_id}{'-full' if full else ''}.jsonl"

        try:
            fields = self._round(job, tenant, state, change_file, result, started, interrupted, progress)
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
            if isinstance(exc, LicenceRequired):
                result.message = licence_message(job, tenant, exc)
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
                "query": saved_query(job),
                "last_run_id": result.run_id,
                "last_success": iso_utc(self._clock()),
                "last_success_started": iso_utc(started),
                "objects": result.objects,
                "changes": result.changes,
                "replica": self.replica,
                "last_error": None,
            }
            | _notified(state, notified)
            | fields,
        )
        if not saved:  # the data is published and safe; the next run fetches these changes again
            result.status, result.message = "failed", "published, but the cursor (state.json) could not be saved"
        return self._finish(result, started)

    def _round(
        self,
        job: JobSettings,
        tenant: str,
        state: dict[str, Any],
        change_file: Callable[[bool], str],
        result: RunResult,
        started: float,
        interrupted: Callable[[], bool],
        progress: Progress | None,
    ) -> dict[str, Any]:
        """Run the round of the job's kind, fill in ``result``'s counts, return the state fields that kind keeps."""
        if job.cursor is not None:
            read = self._log_rounds.run(
                job, tenant, state, change_file, now=started, interrupted=interrupted, progress=progress
            )
            result.objects = result.changes = read.written
            result.pages = read.pages
            return {"cursor": read.cursor.as_state()}
        done = self._rounds.run(
            job,
            tenant,
            state,
            change_file,
            interrupted=interrupted,
            progress=progress,
            reconcile=reconciliation_due(job, state, started),
        )
        result.objects, result.changes, result.pages = done.objects, done.changes, done.pages
        result.full, result.resync = done.full, done.resync
        fields = {"delta_link": done.delta_link, TABLES_HELD: done.tables}
        fields |= _snapshot_state(done) | _reconcile_state(done, started)
        if done.drift is not None:
            report_drift(done.drift, tenant, job.name)
            export_reconciliation(tenant, job.name, fields["reconciliation"])
        return fields

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
            if result.changes and not result.full:
                ROUNDS_WITH_CHANGES.labels(result.tenant, result.job).inc()
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


def licence_message(job: JobSettings, tenant: str, exc: GraphError) -> str:
    """Why a job fails for a tenant without the licence its collection needs, naming the licence and the way out."""
    licence = LICENCES.get(job.resource, "a Microsoft Entra ID premium licence (P1 or P2)")
    return (
        f"{job.resource} needs {licence}, which tenant {tenant} lacks: license the tenant, or leave it out of job "
        f"{job.name} (jobs.tenants); the tenant's other jobs are not affected ({exc})"
    )


def _export_recorded(tenant: str, job: str, state: dict[str, Any]) -> None:
    """Re-export what ``state.json`` says of the whole fleet, so that alerts need no success in this process.

    A restarted replica's gauges start empty: without this, the last success and the last reconciliation would
    vanish from its ``/metrics`` until it next ran the job itself. Every try reads the state anyway (a peek, or
    under the lock), so this costs no request.
    """
    last_success = state.get("last_success")
    if isinstance(last_success, str):
        with contextlib.suppress(ValueError):  # an unreadable time is not worth failing the run over
            JOB_LAST_SUCCESS.labels(tenant, job).set(epoch(last_success))
    if "reconciliation" in state:
        export_reconciliation(tenant, job, state["reconciliation"])


def _reconcile_state(done: Round, started: float) -> dict[str, Any]:
    """When the last full round was (it times the next reconciliation), and what the last reconciliation found."""
    state: dict[str, Any] = {LAST_FULL_ROUND: iso_utc(started)} if done.full else {}
    if done.drift is not None:
        state["reconciliation"] = {"at": iso_utc(started), **done.drift.as_state()}
    return state


def served_slot(job: str, tenant: str, state: dict[str, Any] | None, due_after: float) -> RunResult | None:
    """``skipped`` when ``state`` records a success that started at or after ``due_after``, naming who ran it."""
    last_started = (state or {}).get("last_success_started")
    if not last_started or epoch(last_started) < due_after:
        return None
    runner = (state or {}).get("replica")
    where = f" on {runner}" if runner else ""
    return RunResult(tenant, job, "skipped", message=f"already ran at {last_started}{where}", runner=runner)


def _snapshot_state(done: Round) -> dict[str, Any]:
    """What ``status`` shows of the snapshot: recorded when this round published or compared it."""
    if done.publication is None or done.publication.version is None:
        return {}
    return {
        "snapshot": {
            "version": done.publication.version,
            "bytes": done.publication.size,
            "chunks": done.publication.chunks,
        }
    }
