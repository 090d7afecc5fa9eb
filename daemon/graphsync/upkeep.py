"""The tables' upkeep as the fleet runs it: once per slot, by one replica, like a job (``[output]
tables_upkeep_every``, default ``"1d"``).

It takes the same machinery as a job's run (:mod:`graphsync.jobs`): a lease on a lock blob
(``locks/tables/_upkeep.lock``) so that one replica works at a time, and a state file
(``<output>/tables/_upkeep/state.json``) whose ``last_success_started`` tells every other replica that the slot was
served — read first without the lease (a peek), so a served slot costs each other replica one read. The work
itself (:mod:`graphsync.tables.upkeep`) stops between partitions once the daemon stops or the lease is lost, and the
next slot takes over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from graphsync.jobs import LOCK_SECONDS, RunResult, lock_blob, replica_name, served_slot
from graphsync.metrics import JOB_RUNS
from graphsync.schedule import interval_seconds
from graphsync.storage import StorageError, WriteConflict
from graphsync.timestamps import iso_utc

if TYPE_CHECKING:
    from graphsync.sinks import Sink
    from graphsync.storage import BlobStore
    from graphsync.tables import RoundTables

log = logging.getLogger(__name__)

SCOPE, NAME = "tables", "_upkeep"  # state: <output>/tables/_upkeep/state.json; lock: locks/tables/_upkeep.lock


@dataclass(frozen=True)
class UpkeepSchedule:
    """``tables_upkeep_every`` as a :class:`graphsync.schedule.Schedule`: fleet-wide slots from the epoch."""

    every: str

    @property
    def interval_seconds(self) -> int | None:
        return interval_seconds(self.every)

    @property
    def cron(self) -> str | None:
        return None


class UpkeepRunner:
    """Runs the upkeep of ``names`` when the slot is not served yet and no other replica is at it."""

    def __init__(
        self,
        *,
        tables: RoundTables,
        names: Iterable[str],
        sink: Sink,
        locks: BlobStore,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tables = tables
        self._names = list(names)
        self._sink = sink
        self._locks = locks
        self.replica = replica or replica_name()
        self._clock = clock

    def run(self, *, due_after: float, stop: threading.Event | None = None) -> RunResult:
        """``skipped`` if the slot from ``due_after`` was served (checked before and under the lease), ``busy`` if
        another replica holds the lease, else ``ok`` or ``failed`` after compacting, vacuuming and checkpointing."""
        stop = stop or threading.Event()
        try:
            state, _ = self._sink.read_state(SCOPE, NAME)
            if (served := served_slot(NAME, SCOPE, state, due_after)) is not None:  # the peek: no lease needed
                return self._finish(served)
            lease = self._locks.try_lease(lock_blob(SCOPE, NAME), LOCK_SECONDS)
        except StorageError as exc:
            return self._finish(RunResult(SCOPE, NAME, "failed", message=str(exc)))
        if lease is None:
            return self._finish(RunResult(SCOPE, NAME, "busy", message="running on another replica"))
        with lease:
            try:
                state, etag = self._sink.read_state(SCOPE, NAME)
                if (served := served_slot(NAME, SCOPE, state, due_after)) is not None:
                    return self._finish(served)
                lease.announce(self.replica)
                started = self._clock()
                done = self._tables.upkeep(self._names, lambda: stop.is_set() or lease.lost)
                if stop.is_set() or lease.lost:
                    return self._finish(RunResult(SCOPE, NAME, "stopped", message="stopped between tables"))
                record = {
                    "last_success": iso_utc(self._clock()),
                    "last_success_started": iso_utc(started),
                    "replica": self.replica,
                    "tables": done,
                }
                self._sink.write_state(SCOPE, NAME, (state or {}) | record, if_match=etag)
            except (StorageError, WriteConflict, OSError) as exc:  # deltalake's errors are OSError or DeltaError
                return self._finish(RunResult(SCOPE, NAME, "failed", message=str(exc), runner=self.replica))
            except Exception as exc:  # any failure is this run's result, never the scheduler's problem
                log.exception("table upkeep failed")
                return self._finish(RunResult(SCOPE, NAME, "failed", message=str(exc), runner=self.replica))
        return self._finish(RunResult(SCOPE, NAME, "ok", runner=self.replica, duration=self._clock() - started))

    def _finish(self, result: RunResult) -> RunResult:
        JOB_RUNS.labels(result.tenant, result.job, result.status).inc()
        level = logging.ERROR if result.status == "failed" else logging.INFO
        log.log(level, "table upkeep %s%s", result.status, f": {result.message}" if result.message else "")
        return result
