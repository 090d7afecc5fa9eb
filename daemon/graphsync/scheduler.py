"""The long-running daemon: one APScheduler job per (job, tenant), a heartbeat, and a clean stop on a signal.

The slots themselves (fleet-wide, aligned to an epoch, with the jitter applied inside each run) are defined in
:mod:`graphsync.schedule`; this module runs them.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from graphsync.schedule import first_run, jitter, slot_start, trigger
from graphsync.systemd import Notifier

if TYPE_CHECKING:
    from graphsync.config import JobSettings, Settings
    from graphsync.health import HealthServer
    from graphsync.jobs import JobRunner

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
STOP_GRACE_SECONDS = 8.0  # systemd and Kubernetes give 10 s or more before SIGKILL; keep a margin


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
