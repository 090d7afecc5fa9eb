"""The change-notification service a daemon replica runs beside its scheduler (a :class:`scheduler.Companion`).

It serves the endpoint, looks after subscriptions each ``check_every`` slot, and turns what Graph says into tries:

- a change notification for (tenant, job) asks the daemon for an urgent try due ``debounce_seconds`` after it came,
  serving every run started after it came (``Daemon.hurry``). The pool merges tries of a pair that is waiting, and
  never runs a pair twice at once; the job lease does the same fleet-wide. So a burst within the debounce window
  makes one round, and notifications that come while it runs make one more round after it, whichever replicas
  they reached: a replica whose try finds the round running elsewhere looks again shortly, and skips if that
  round (or a later one) started after its notification;
- ``missed`` is a catch-up round at once (a delta round fetches whatever the notifications did not say);
- ``reauthorizationRequired`` renews the subscription now, ``subscriptionRemoved`` creates it again and then runs
  a catch-up round; both on a worker thread, never in the request.

When the endpoint is unreachable nothing is lost: the schedule still runs every job, and a delta round fetches every
change since the last one, announced or not.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from graphsync.notify.records import RecordError, SubscriptionRecords
from graphsync.schedule import slot_start
from graphsync.storage import BlobStore, StorageError

if TYPE_CHECKING:
    from graphsync.config import JobSettings, Settings
    from graphsync.jobs import RunResult
    from graphsync.pool import Try

log = logging.getLogger(__name__)

ACTION_RETRY_SECONDS = 2.0  # a lifecycle action that found the tenant busy is tried again this much later
ACTION_ATTEMPTS = 10
FAILURE_RETRY_SECONDS = 30.0  # a maintenance with a failed call (e.g. the handshake reached no replica) retries


class Hurry(Protocol):
    """``Daemon.hurry``: run the pair at ``not_before`` unless a run started at or after ``after`` serves it;
    ``notified`` (when a notification asked for it) is recorded by the run."""

    def __call__(
        self, job: JobSettings, tenant: str, *, after: float, not_before: float, notified: float | None = None
    ) -> None: ...


@dataclass(frozen=True)
class _Every:
    """The maintenance schedule, as :mod:`graphsync.schedule` reads one."""

    interval_seconds: int
    cron: None = None


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
        self._settings = settings
        self._config = settings.notifications
        self._hurry = hurry
        self._clock = clock
        self._jobs = {job.name: job for job in settings.jobs}
        self._stop = threading.Event()
        self._work: queue.Queue[tuple[str, str, Action | None, int] | None] = queue.Queue()
        self._waiting: dict[tuple[str, str], tuple[float, float]] = {}  # pair -> first, last notification waiting
        self._waiting_lock = threading.Lock()
        self._records = SubscriptionRecords(store, settings.storage.encryption_keys)
        self.directory = Directory(self._request_refresh)
        self.manager = SubscriptionManager(
            settings,
            graph,
            self._records,
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
        self._threads = [
            threading.Thread(target=self._maintain_each_slot, name="subscriptions", daemon=True),
            threading.Thread(target=self._do_work, name="notification work", daemon=True),
        ]

    def start(self) -> None:
        SUBSCRIPTION_RENEW_BEFORE.set(self._config.renew_before_seconds)
        self.endpoint.start()
        for thread in self._threads:
            thread.start()
        log.info("notification endpoint listening on %s:%d", *self.endpoint.address[:2])

    def stop(self) -> None:
        self._stop.set()
        self._work.put(None)
        self.endpoint.stop()

    def deliver(self, notifications: list[Notification], received: float) -> None:
        """The endpoint's verified notifications: queue what they ask for (called in the request; returns at once)."""
        for note in notifications:
            tenant, job = note.entry.tenant, note.entry.job
            NOTIFICATIONS_RECEIVED.labels(tenant, job, note.event or "change").inc()
            NOTIFICATION_LAST.labels(tenant, job).set(received)
            if note.event is None:
                self._run_soon(tenant, job, received, received + self._config.debounce_seconds, notified=True)
            elif note.event == "missed":
                self._run_soon(tenant, job, received, received, notified=True)
            else:
                action: Action = "renew" if note.event == "reauthorizationRequired" else "recreate"
                self._work.put((tenant, job, action, 0))

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
        self, tenant: str, job_name: str, received: float, not_before: float, *, notified: bool = False
    ) -> None:
        job = self._jobs.get(job_name)
        if job is None:  # a subscription of a job no longer configured; the next maintenance deletes it
            return
        with self._waiting_lock:
            first, _ = self._waiting.get((tenant, job_name), (received, received))
            self._waiting[tenant, job_name] = (min(first, received), received)
        self._hurry(job, tenant, after=received, not_before=not_before, notified=received if notified else None)

    def _catch_up(self, tenant: str, job: str) -> None:
        now = self._clock()
        self._run_soon(tenant, job, now, now)

    def _request_refresh(self) -> None:
        self._work.put(("", "", None, 0))

    def _maintain_each_slot(self) -> None:
        """Every replica tries each slot, at a random moment early in it; the first to get there does the work.

        A tenant whose maintenance failed in part (Graph refused a call, or the validation handshake reached no
        replica during a rolling start) is tried again within the slot rather than a whole ``check_every`` later.
        """
        schedule = _Every(self._config.check_seconds)
        spread = min(self._config.check_seconds * 0.1, 10.0)
        due = self._clock()  # right away: a new fleet creates its subscriptions at start
        retry_at, failed = float("inf"), list[str]()
        while not self._stop.wait(max(0.0, min(due, retry_at) - self._clock())):
            if self._clock() >= due:
                current = slot_start(schedule, self._clock())
                slot: float | None = current
                tenants = self._settings.identity.tenants
                due = current + self._config.check_seconds + random.uniform(0, spread)
            else:  # within the slot, which is served already: only the tenants whose maintenance failed
                slot, tenants = None, failed
            failed = [tenant for tenant in tenants if self._maintain(tenant, slot) in ("incomplete", "failed")]
            retry_at = self._clock() + min(FAILURE_RETRY_SECONDS, spread * 3 or 1.0) if failed else float("inf")
            if self._stop.is_set():
                return

    def _maintain(self, tenant: str, slot: float | None, actions: dict[str, Action] | None = None) -> str:
        try:
            return self.manager.maintain(tenant, slot, actions)
        except (StorageError, RecordError) as exc:
            log.error("cannot look after the subscriptions of %s: %s", tenant, exc, extra={"tenant": tenant})
        except Exception:  # the thread must survive whatever one tenant's maintenance does
            log.exception("maintenance of the subscriptions of %s failed unexpectedly", tenant)
        return "failed"

    def _do_work(self) -> None:
        """Lifecycle actions and record refreshes, one at a time, off the request threads."""
        while (work := self._work.get()) is not None:
            tenant, job, action, attempt = work
            if action is None:
                for each in self._settings.identity.tenants:
                    try:
                        self.directory.learn(self._records.read(each))
                    except (StorageError, RecordError) as exc:
                        log.warning("cannot read the subscription record of %s: %s", each, exc)
                continue
            if self._maintain(tenant, None, {job: action}) == "busy" and attempt + 1 < ACTION_ATTEMPTS:
                threading.Timer(ACTION_RETRY_SECONDS, self._work.put, [(tenant, job, action, attempt + 1)]).start()


def _path(url: str) -> str:
    return urlsplit(url).path.rstrip("/")
