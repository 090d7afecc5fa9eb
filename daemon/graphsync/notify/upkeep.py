"""The service's background work: each tenant's subscriptions looked after every ``check_every`` slot, and the
lifecycle actions and record re-reads that a request must not wait for (Graph wants its answer within 3 s).

Two threads: one wakes at each slot (at a random moment early in it, so replicas do not all arrive at once; the
first to get there does the work, :meth:`SubscriptionManager.maintain`) and again shortly for tenants whose
maintenance failed in part; the other takes queued work one item at a time.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from graphsync.notify.manager import Action, SubscriptionManager
from graphsync.notify.records import RecordError, SubscriptionRecords, TenantRecord
from graphsync.schedule import slot_start
from graphsync.storage import StorageError

if TYPE_CHECKING:
    from graphsync.config import Settings

log = logging.getLogger(__name__)

ACTION_RETRY_SECONDS = 2.0  # a lifecycle action that found the tenant busy is tried again this much later
ACTION_ATTEMPTS = 10
FAILURE_RETRY_SECONDS = 30.0  # a maintenance with a failed call (e.g. the handshake reached no replica) retries

_Work = tuple[str, str, Action, int] | None  # (tenant, job, action, attempt); None: re-read every record
_STOP = object()


@dataclass(frozen=True)
class _Every:
    """The maintenance schedule, as :mod:`graphsync.schedule` reads one."""

    interval_seconds: int
    cron: None = None


class Upkeep:
    def __init__(
        self,
        settings: Settings,
        manager: SubscriptionManager,
        records: SubscriptionRecords,
        learn: Callable[[TenantRecord], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert settings.notifications is not None
        self._tenants = settings.identity.tenants
        self._check_seconds = settings.notifications.check_seconds
        self._manager = manager
        self._records = records
        self._learn = learn
        self._clock = clock
        self._stop = threading.Event()
        self._work: queue.Queue[_Work | object] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._maintain_each_slot, name="subscriptions", daemon=True),
            threading.Thread(target=self._do_work, name="notification work", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._work.put(_STOP)

    def act(self, tenant: str, job: str, action: Action) -> None:
        """Do a lifecycle notification's ``action`` soon, retried while another replica holds the tenant."""
        self._work.put((tenant, job, action, 0))

    def refresh(self, done: Callable[[], None]) -> None:
        """Read every tenant's record again soon (a notification named a subscription not known here); ``done``
        is called once they have been read."""
        self._work.put(done)

    def _maintain_each_slot(self) -> None:
        """Every replica tries each slot, at a random moment early in it; the first to get there does the work.

        A tenant whose maintenance failed in part (Graph refused a call, or the validation handshake reached no
        replica during a rolling start) is tried again within the slot rather than a whole ``check_every`` later.
        """
        schedule = _Every(self._check_seconds)
        spread = min(self._check_seconds * 0.1, 10.0)
        due = self._clock()  # right away: a new fleet creates its subscriptions at start
        retry_at, failed = float("inf"), list[str]()
        while not self._stop.wait(max(0.0, min(due, retry_at) - self._clock())):
            if self._clock() >= due:
                current = slot_start(schedule, self._clock())
                slot: float | None = current
                tenants = self._tenants
                due = current + self._check_seconds + random.uniform(0, spread)
            else:  # within the slot, which is served already: only the tenants whose maintenance failed
                slot, tenants = None, failed
            failed = [tenant for tenant in tenants if self._maintain(tenant, slot) in ("incomplete", "failed")]
            retry_at = self._clock() + min(FAILURE_RETRY_SECONDS, spread * 3 or 1.0) if failed else float("inf")
            if self._stop.is_set():
                return

    def _maintain(self, tenant: str, slot: float | None, actions: dict[str, Action] | None = None) -> str:
        try:
            return self._manager.maintain(tenant, slot, actions)
        except (StorageError, RecordError) as exc:
            log.error("cannot look after the subscriptions of %s: %s", tenant, exc, extra={"tenant": tenant})
        except Exception:  # the thread must survive whatever one tenant's maintenance does
            log.exception("maintenance of the subscriptions of %s failed unexpectedly", tenant)
        return "failed"

    def _do_work(self) -> None:
        """Lifecycle actions and record refreshes, one at a time, off the request threads."""
        while (work := self._work.get()) is not _STOP:
            if callable(work):
                for tenant in self._tenants:
                    try:
                        self._learn(self._records.read(tenant))
                    except (StorageError, RecordError) as exc:
                        log.warning("cannot read the subscription record of %s: %s", tenant, exc)
                work()
                continue
            assert isinstance(work, tuple)
            tenant, job, action, attempt = work
            if self._maintain(tenant, None, {job: action}) == "busy" and attempt + 1 < ACTION_ATTEMPTS:
                retry = threading.Timer(ACTION_RETRY_SECONDS, self._work.put, [(tenant, job, action, attempt + 1)])
                retry.daemon = True  # a stop never waits for it
                retry.start()
