"""The change-notification service a daemon replica runs beside its scheduler (a :class:`scheduler.Companion`).

It serves the endpoint, has subscriptions looked after each ``check_every`` slot (:mod:`graphsync.notify.upkeep`),
and turns what Graph says into tries:

- a change notification for (tenant, job) asks the daemon for an urgent try due ``debounce_seconds`` after it came,
  serving every run started after it came (``Daemon.hurry``). Each notification of a burst moves that time on
  (the round waits until the burst has been quiet ``debounce_seconds``), but never past :data:`BURST_WAIT`
  debounces after the burst's first notification, so a steady stream still gets a round every few seconds. The
  pool merges tries of a pair that is waiting, and never runs a pair twice at once; the job lease does the same
  fleet-wide. So a burst makes one round, and notifications that come while it runs make one more round after
  it, whichever replicas they reached: a replica whose try finds the round running elsewhere looks again shortly,
  and skips if that round (or a later one) started after its notification;
- ``missed`` is a catch-up round at once (a delta round fetches whatever the notifications did not say);
- ``reauthorizationRequired`` renews the subscription now, ``subscriptionRemoved`` creates it again and then runs
  a catch-up round; both on a worker thread, never in the request.

When the endpoint is unreachable nothing is lost: the schedule still runs every job, and a delta round fetches every
change since the last one, announced or not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from graphsync.graph import GraphClient
from graphsync.metrics import (
    NOTIFICATION_DELAY,
    NOTIFICATION_LAST,
    NOTIFICATIONS_RECEIVED,
    SUBSCRIPTION_RENEW_BEFORE,
)
from graphsync.notify.directory import Directory
from graphsync.notify.endpoint import Notification, NotificationEndpoint
from graphsync.notify.manager import Action, SubscriptionManager
from graphsync.notify.records import SubscriptionRecords
from graphsync.notify.upkeep import Upkeep
from graphsync.storage import BlobStore

if TYPE_CHECKING:
    from graphsync.config import JobSettings, Settings
    from graphsync.jobs import RunResult
    from graphsync.pool import Try

log = logging.getLogger(__name__)

BURST_WAIT = 3  # debounces after a burst's first notification, at most, before its round is due


class Hurry(Protocol):
    """``Daemon.hurry``: run the pair at ``not_before`` unless a run started at or after ``after`` serves it;
    ``notified`` (when a notification asked for it) is recorded by the run."""

    def __call__(
        self, job: JobSettings, tenant: str, *, after: float, not_before: float, notified: float | None = None
    ) -> None: ...


class NotificationService:
    def __init__(
        self,
        settings: Settings,
        hurry: Hurry,
        graph: GraphClient,
        store: BlobStore,
        *,
        replica: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert settings.notifications is not None
        self._config = settings.notifications
        self._hurry = hurry
        self._clock = clock
        self._jobs = {job.name: job for job in settings.jobs}
        self._waiting: dict[tuple[str, str], tuple[float, float]] = {}  # pair -> first, last notification waiting
        self._waiting_lock = threading.Lock()
        records = SubscriptionRecords(store, settings.storage.encryption_keys)
        self.directory = Directory(lambda done: self._upkeep.refresh(done))
        self.manager = SubscriptionManager(
            settings,
            graph,
            records,
            store,
            replica=replica,
            learn=self.directory.learn,
            catch_up=self._catch_up,
            clock=clock,
        )
        self.endpoint = NotificationEndpoint(
            self._config.host,
            self._config.port,
            paths=tuple(dict.fromkeys(_path(url) for url in (self._config.notification_url, self._config.lifecycle))),
            directory=self.directory,
            deliver=self.deliver,
            max_body_bytes=self._config.max_body_bytes,
            clock=clock,
        )
        self._upkeep = Upkeep(settings, self.manager, records, self.directory.learn, clock=clock)

    def start(self) -> None:
        SUBSCRIPTION_RENEW_BEFORE.set(self._config.renew_before_seconds)
        self.endpoint.start()
        self._upkeep.start()
        log.info("notification endpoint listening on %s:%d", *self.endpoint.address[:2])

    def stop(self) -> None:
        self._upkeep.stop()
        self.endpoint.stop()

    def deliver(self, notifications: list[Notification], received: float) -> None:
        """The endpoint's verified notifications: queue what they ask for (called in the request; returns at once)."""
        for note in notifications:
            tenant, job = note.entry.tenant, note.entry.job
            NOTIFICATIONS_RECEIVED.labels(tenant, job, note.event or "change").inc()
            NOTIFICATION_LAST.labels(tenant, job).set(received)
            if note.event is None:
                self._run_soon(tenant, job, received, debounce=self._config.debounce_seconds, notified=True)
            elif note.event == "missed":
                self._run_soon(tenant, job, received, notified=True)
            else:
                action: Action = "renew" if note.event == "reauthorizationRequired" else "recreate"
                self._upkeep.act(tenant, job, action)

    def ran(self, attempt: Try, result: RunResult) -> None:
        """A try ended: if it served notifications waiting here, their delay to the published round is known."""
        if attempt.slot is None or result.status not in ("ok", "skipped"):
            return
        pair = (attempt.tenant, attempt.job.name)
        with self._waiting_lock:
            first, last = self._waiting.get(pair, (None, None))
            if first is None or last is None or attempt.slot < first:
                return
            if attempt.slot >= last:
                del self._waiting[pair]
            else:
                self._waiting[pair] = (last, last)
        NOTIFICATION_DELAY.labels(*pair).observe(self._clock() - first)

    def _run_soon(
        self, tenant: str, job_name: str, received: float, *, debounce: float = 0.0, notified: bool = False
    ) -> None:
        """Ask for a round serving a notification ``received`` now: ``debounce`` after it, or after the first one
        still waiting if that is sooner than :data:`BURST_WAIT` debounces (see the module docstring)."""
        job = self._jobs.get(job_name)
        if job is None:  # a subscription of a job no longer configured; the next maintenance deletes it
            return
        with self._waiting_lock:
            first, _ = self._waiting.get((tenant, job_name), (received, received))
            first = min(first, received)
            self._waiting[tenant, job_name] = (first, received)
        not_before = min(received + debounce, first + BURST_WAIT * debounce)
        self._hurry(job, tenant, after=received, not_before=not_before, notified=received if notified else None)

    def _catch_up(self, tenant: str, job: str) -> None:
        self._run_soon(tenant, job, self._clock())


def _path(url: str) -> str:
    return urlsplit(url).path.rstrip("/")
