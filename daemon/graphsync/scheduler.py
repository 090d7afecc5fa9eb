"""The long-running daemon: one APScheduler job per (job, tenant), a heartbeat, and a clean stop on a signal.

Every replica runs the same schedule, aligned to the epoch, so the fleet fires each (tenant, job) in the same
slots: ``every = "15m"`` means :00, :15, :30, :45 for the whole fleet. The first replica to take the job's lease in
a slot runs it; the others find the slot already served (see :func:`slot_start`) and skip.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from graphsync.config import crontab_trigger
from graphsync.jobs import JobRunner, epoch, lock_blob
from graphsync.sinks import Sink
from graphsync.storage import BlobStore, StorageError
from graphsync.systemd import Notifier
from graphsync.tokencache import TokenCaches

if TYPE_CHECKING:
    from graphsync.config import JobSettings, Settings
    from graphsync.health import HealthServer

log = logging.getLogger(__name__)

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
HEARTBEAT_SECONDS = 5.0
STOP_GRACE_SECONDS = 8.0  # systemd and Kubernetes give 10 s or more before SIGKILL; keep a margin
CRON_JITTER_SECONDS = 20.0


def jitter(job: JobSettings) -> float:
    """Spread runs a little so many jobs do not hit Graph in the same second; small against the slot."""
    return min(job.interval_seconds * 0.1, 30.0) if job.interval_seconds else CRON_JITTER_SECONDS


def trigger(job: JobSettings) -> BaseTrigger:
    """The fleet-wide slots of a job, without jitter.

    APScheduler 3 computes an interval's next fire time from the previous *jittered* one, so trigger jitter
    accumulates and replicas drift apart; the jitter is applied inside the run instead (:meth:`Daemon._run`).
    """
    if job.interval_seconds:
        return IntervalTrigger(seconds=job.interval_seconds, start_date=EPOCH, timezone=UTC)
    return crontab_trigger(job.cron)


def slot_start(job: JobSettings, now: float) -> float:
    """When the current slot began; a run that started after it already served the slot, so others skip.

    Interval jobs: the last multiple of the interval since the epoch. Cron jobs: fire times have minute
    resolution and the jitter stays well under a minute, so the slot is the current minute.
    """
    period = job.interval_seconds or 60
    origin = EPOCH.timestamp()  # the same origin as the interval trigger's start_date
    return origin + math.floor((now - origin) / period) * period


def first_run(job: JobSettings, now: float) -> float | None:
    """When to run soon after start, unless the next slot is near anyway (within half an interval, at most 60 s).

    The first run skips like any other if the fleet already served the current slot, so a rolling restart
    causes no extra runs. Cron jobs wait for their schedule: an operator who chose cron chose the times too.
    """
    if not job.interval_seconds:
        return None
    near = min(job.interval_seconds / 2, 60.0)
    left = slot_start(job, now) + job.interval_seconds - now
    if left <= near:
        return None
    return now + random.uniform(0, min(5.0, left - near))


class Daemon:
    def __init__(
        self,
        settings: Settings,
        runner: JobRunner,
        *,
        notifier: Notifier | None = None,
        health: Callable[[Daemon], HealthServer] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._runner = runner
        self._notifier = notifier or Notifier()
        self._clock = clock
        self._stop = threading.Event()
        self._active = 0
        self._active_lock = threading.Lock()
        self._last_beat = clock()
        self._beat_seconds = min(HEARTBEAT_SECONDS, self._notifier.watchdog_interval or HEARTBEAT_SECONDS)
        pairs = [(job, tenant) for job in settings.jobs for tenant in settings.job_tenants(job)]
        self._pairs = len(pairs)
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={
                "default": ThreadPoolExecutor(max_workers=max(1, min(8, len(pairs)))),
                "heartbeat": ThreadPoolExecutor(max_workers=1),  # never queued behind a long run
            },
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        for job, tenant in pairs:
            name = f"{tenant}/{job.name}"
            self._scheduler.add_job(self._run, trigger(job), args=(job, tenant), id=name, name=name)
            if (first := first_run(job, clock())) is not None:
                # A separate one-off job: overriding the interval job's first fire time would shift all its slots.
                self._scheduler.add_job(
                    self._run,
                    DateTrigger(datetime.fromtimestamp(first, UTC)),
                    args=(job, tenant),
                    id=f"{name} (first run)",
                    name=f"{name} (first run)",
                )
        self._health = health(self) if health else None

    def live(self) -> tuple[bool, str]:
        age = self._clock() - self._last_beat
        return age < 3 * self._beat_seconds, f"scheduler loop last turned {age:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "stopping"
        return self._scheduler.running, "scheduler running" if self._scheduler.running else "scheduler not running"

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        if self._health:
            self._health.start()
        self._scheduler.start()
        self._notifier.ready()
        self._beat()
        # Added only now, so that no heartbeat (WATCHDOG=1) can reach systemd before READY=1.
        self._scheduler.add_job(
            self._beat, IntervalTrigger(seconds=self._beat_seconds), id="heartbeat", executor="heartbeat"
        )
        log.info("scheduler running %d (job, tenant) pair(s) as %s", self._pairs, self._runner.replica)
        self._stop.wait()
        return self._shutdown()

    def _shutdown(self) -> int:
        self._notifier.stopping()
        log.info("stopping: waiting up to %.0f s for running jobs to reach a page boundary", STOP_GRACE_SECONDS)
        self._scheduler.shutdown(wait=False)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self._active and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._health:
            self._health.stop()
        if self._active:
            # A worker is stuck inside one HTTP call. Nothing half-written is visible (files are replaced
            # atomically and the cursor is saved last), so leaving now loses nothing.
            log.warning("%d job run(s) still busy after %.0f s; exiting without them", self._active, STOP_GRACE_SECONDS)
            logging.shutdown()
            os._exit(0)
        log.info("stopped")
        return 0

    def _beat(self) -> None:
        """Runs from the scheduler's own loop: if that loop hangs, the beats stop and so does the watchdog."""
        self._last_beat = self._clock()
        self._notifier.watchdog()

    def _run(self, job: JobSettings, tenant: str) -> None:
        if self._stop.wait(random.uniform(0, jitter(job))):
            return
        with self._active_lock:
            self._active += 1
        try:
            if self._stop.is_set():  # a stop that came just now: shutdown may not have seen this run as active
                return
            self._runner.run(job, tenant, due_after=slot_start(job, self._clock()), stop=self._stop)
        except Exception:  # a run must never take the scheduler's worker down with it
            log.exception(
                "run of %s/%s failed unexpectedly", tenant, job.name, extra={"tenant": tenant, "job": job.name}
            )
        finally:
            with self._active_lock:
                self._active -= 1


DELTA_TOKEN_WARNING_SECONDS = 6 * 24 * 3600  # directory delta tokens expire after 7 days


def fleet_status(settings: Settings, caches: TokenCaches, sink: Sink, locks: BlobStore, now: float) -> dict[str, Any]:
    """What ``graphsync status`` reports: each tenant's shared token cache and each job's state, fleet-wide."""
    jobs = []
    for job in settings.jobs:
        for tenant in settings.job_tenants(job):
            try:
                state = sink.read_state(tenant, job.name)[0] or {}
            except StorageError as exc:  # report it on this job's line; the other lines still help
                state = {"last_error": f"state.json unreadable: {exc}"}
            try:
                holder = locks.lease_holder(lock_blob(tenant, job.name))
            except StorageError as exc:
                holder = f"unknown ({exc})"
            next_due = trigger(job).get_next_fire_time(None, datetime.fromtimestamp(now, UTC))
            warnings = []
            last_success = state.get("last_success")
            if job.delta and last_success and now - epoch(last_success) > DELTA_TOKEN_WARNING_SECONDS:
                warnings.append(
                    "last success is over 6 days old: the delta token expires after 7 days, "
                    "and the next run will be a full resync"
                )
            jobs.append(
                {
                    "tenant": tenant,
                    "job": job.name,
                    "resource": job.resource,
                    "last_success": last_success,
                    "last_failure": state.get("last_failure"),
                    "last_error": state.get("last_error"),
                    "objects": state.get("objects"),
                    "next_due": next_due.isoformat() if next_due else None,
                    "lock_holder": holder,
                    "warnings": warnings,
                }
            )
    tenants = [caches[tenant].inspect_blob() for tenant in caches.tenants]
    return {"output": sink.describe(), "tenants": tenants, "jobs": jobs}
