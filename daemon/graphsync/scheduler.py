"""The long-running daemon: the (job, tenant) slots, the pool that runs them, a heartbeat, a clean stop on a signal.

APScheduler only keeps time: at each slot (fleet-wide, aligned to an epoch; :mod:`graphsync.schedule`) it hands the
pair to the bounded pool of :mod:`graphsync.pool` as a try that comes due after the pair's jitter, plus a head
start when another replica ran it last, plus a little per run in flight (:mod:`graphsync.affinity`). Waiting costs
no worker: a worker takes a try only when it is due, so the jitter never holds back other pairs.

A companion (the change-notification service, :mod:`graphsync.notify`) may hand the pool urgent tries between
slots (:meth:`Daemon.hurry`); one that finds the pair running on another replica is tried again shortly, because
that run may have started before the notification came.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from graphsync.affinity import Affinity
from graphsync.pool import STOP_GRACE_SECONDS, RunPool, Try, exit_now
from graphsync.schedule import first_run, slot_jitter, slot_start, trigger
from graphsync.systemd import Notifier
from graphsync.upkeep import UpkeepSchedule

if TYPE_CHECKING:
    from graphsync.config import JobSettings, Settings
    from graphsync.health import HealthServer
    from graphsync.jobs import JobRunner, RunResult
    from graphsync.upkeep import UpkeepRunner

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
URGENT_RETRY_SECONDS = 1.0  # an urgent try that found its pair busy elsewhere looks again at least this much later
URGENT_RETRY_MAX_SECONDS = 30.0  # and at most this much later


class Companion(Protocol):
    """Runs beside the scheduler while the daemon runs, and hears how each try ended."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def ran(self, attempt: Try, result: RunResult) -> None: ...


class Daemon:
    def __init__(
        self,
        settings: Settings,
        runner: JobRunner,
        *,
        notifier: Notifier | None = None,
        health: Callable[[Daemon], HealthServer] | None = None,
        companion: Callable[[Daemon], Companion] | None = None,
        clock: Callable[[], float] = time.time,
        upkeep: UpkeepRunner | None = None,
    ) -> None:
        self._settings = settings
        self._runner = runner
        self._notifier = notifier or Notifier()
        self._clock = clock
        self._stop = threading.Event()
        self._affinity = Affinity(runner.replica)
        self._pool = RunPool(
            self._run,
            concurrency=settings.run.concurrency,
            per_tenant=settings.run.per_tenant,
            stop=self._stop,
            delay=self._affinity,
            clock=clock,
        )
        self._last_beat = clock()
        self._beat_seconds = min(HEARTBEAT_SECONDS, self._notifier.watchdog_interval or HEARTBEAT_SECONDS)
        pairs = [(job, tenant) for job in settings.jobs for tenant in settings.job_tenants(job)]
        self._pairs = len(pairs)
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={
                "default": ThreadPoolExecutor(max_workers=1),  # only hands tries to the pool
                "heartbeat": ThreadPoolExecutor(max_workers=1),
                "upkeep": ThreadPoolExecutor(max_workers=1),  # the tables' upkeep: long, never in the pool's way
            },
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        for job, tenant in pairs:
            name = f"{tenant}/{job.name}"
            self._scheduler.add_job(self._due, trigger(job), args=(job, tenant), id=name, name=name)
            if (first := first_run(job, clock())) is not None:
                # A separate one-off job: overriding the interval job's first fire time would shift all its slots.
                self._scheduler.add_job(
                    self._due,
                    DateTrigger(datetime.fromtimestamp(first, UTC)),
                    args=(job, tenant),
                    id=f"{name} (first run)",
                    name=f"{name} (first run)",
                )
        if upkeep is not None:
            self._add_upkeep(upkeep, UpkeepSchedule(settings.output.tables_upkeep_every))
        self._health = health(self) if health else None
        self._companion = companion(self) if companion else None

    def _add_upkeep(self, upkeep: UpkeepRunner, schedule: UpkeepSchedule) -> None:
        """The tables' upkeep at each of its slots (and soon after start, unless the next slot is near), once per
        slot fleet-wide (see graphsync.upkeep)."""

        def due() -> None:
            upkeep.run(due_after=slot_start(schedule, self._clock()), stop=self._stop)

        self._scheduler.add_job(due, trigger(schedule), id="table upkeep", executor="upkeep")
        if (first := first_run(schedule, self._clock())) is not None:
            when = DateTrigger(datetime.fromtimestamp(first, UTC))
            self._scheduler.add_job(due, when, id="table upkeep (first run)", executor="upkeep")

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
        self._pool.start()
        self._scheduler.start()
        if self._companion:
            self._companion.start()
        self._notifier.ready()
        self._beat()
        # Added only now, so that no heartbeat (WATCHDOG=1) can reach systemd before READY=1.
        self._scheduler.add_job(
            self._beat, IntervalTrigger(seconds=self._beat_seconds), id="heartbeat", executor="heartbeat"
        )
        log.info(
            "scheduler running %d (job, tenant) pair(s) as %s, %d at once (%d per tenant)",
            self._pairs,
            self._runner.replica,
            self._settings.run.concurrency,
            self._settings.run.per_tenant,
        )
        self._stop.wait()
        return self._shutdown()

    def _shutdown(self) -> int:
        self._notifier.stopping()
        log.info("stopping: waiting up to %.0f s for running jobs to reach a page boundary", STOP_GRACE_SECONDS)
        self._scheduler.shutdown(wait=False)
        if self._companion:
            self._companion.stop()
        self._pool.wake()
        finished = self._pool.join(STOP_GRACE_SECONDS)
        if self._health:
            self._health.stop()
        if not finished:
            stuck = ", ".join(f"{tenant}/{job}" for tenant, job in self._pool.running())
            log.warning("run(s) of %s still busy after %.0f s; exiting without them", stuck, STOP_GRACE_SECONDS)
            exit_now(0)
        log.info("stopped")
        return 0

    def _beat(self) -> None:
        """Runs from the scheduler's own loop: if that loop hangs, the beats stop and so does the watchdog."""
        self._last_beat = self._clock()
        self._notifier.watchdog()

    def _due(self, job: JobSettings, tenant: str) -> None:
        """A slot of the pair began (or its first run after start is due): hand the pool a try of it."""
        now = self._clock()
        slot = slot_start(job, now)
        not_before = max(now, slot + slot_jitter(job, f"{tenant}/{job.name}", slot))
        self._pool.put(Try(job, tenant, not_before, slot))

    def hurry(
        self, job: JobSettings, tenant: str, *, after: float, not_before: float, notified: float | None = None
    ) -> None:
        """Run the pair at ``not_before`` unless a run that started at or after ``after`` serves it (anywhere);
        ``notified``: when the notification asking for it came, which the run records."""
        self._pool.put(Try(job, tenant, not_before, after, urgent=True, notified=notified))

    def _run(self, attempt: Try) -> None:
        job, tenant = attempt.job, attempt.tenant
        if self._stop.is_set():  # a stop that came just now
            return
        # Not first: the pair's last runner has probably served the slot already, so look before leasing.
        peek = not self._affinity.first(job.name, tenant)
        slot = attempt.slot if attempt.slot is not None else slot_start(job, self._clock())
        result = self._runner.run(job, tenant, due_after=slot, stop=self._stop, peek=peek, notified=attempt.notified)
        self._affinity.learn(job.name, tenant, result.runner)
        if attempt.urgent and result.status == "busy":  # that run may have started before the notification
            self._pool.put(replace(attempt, not_before=self._clock() + _urgent_retry(attempt, self._clock())))
        if self._companion:
            self._companion.ran(attempt, result)


def _urgent_retry(attempt: Try, now: float) -> float:
    """How long an urgent try waits before it looks again at a pair another replica is running: half the time since
    the notification came, between :data:`URGENT_RETRY_SECONDS` and :data:`URGENT_RETRY_MAX_SECONDS`, so a
    notification during an hour-long full round costs a few dozen lease attempts, not one a second."""
    since = now - attempt.slot if attempt.slot is not None else 0.0
    return min(URGENT_RETRY_MAX_SECONDS, max(URGENT_RETRY_SECONDS, since / 2))
