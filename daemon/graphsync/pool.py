"""The bounded pool every (tenant, job) run goes through, in ``sync`` and in the daemon: ``[run]`` concurrency.

A fixed number of worker threads (``concurrency``) take pending tries one at a time. A worker takes the try that is
due first among those it may start: at most ``per_tenant`` runs of one tenant at once (Graph throttles per app and
tenant, so a big or throttled tenant holds at most that many workers and delays nobody else), and never a second
run of a pair that is running. Tries become due at their ``not_before`` time plus a delay the owner chooses
(:class:`Delay`: the daemon's affinity delay, fixed when the try is queued, and its load delay, which grows with the
runs in flight); ``sync`` uses none, so its pairs start in the order given, and with one worker exactly one after
the other. Choosing a try costs a few heap operations, not a look at every pending try: a fleet replica holds
hundreds of them, and every worker chooses on every wake-up.

The pool knows nothing of what a run does: :class:`Try` carries the job and tenant to the ``run`` callable, which
must not raise (an exception is logged and the worker goes on).
"""

from __future__ import annotations

import heapq
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, NoReturn, Protocol

if TYPE_CHECKING:
    from graphsync.config import JobSettings

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often an idle worker looks at the stop event when nothing wakes it
STOP_GRACE_SECONDS = 8.0  # systemd and Kubernetes give 10 s or more before SIGKILL; keep a margin


@dataclass(frozen=True)
class Try:
    """One pending run of ``job`` for ``tenant``, not to start before ``not_before`` (a clock time).

    ``slot``: when the slot it serves began, fixed when the slot fired. A try that waits in the pool still serves
    that slot: worked out again when a worker takes it, a cron slot ("the current minute") would have moved on, and a
    success another replica had in the real slot would not count.
    """

    job: JobSettings
    tenant: str
    not_before: float = 0.0
    slot: float | None = None
    urgent: bool = False
    """A change notification's try: ``slot`` is when the notification came, and the owner adds no head start."""
    notified: float | None = None
    """When the notification this try serves came, if one asked for it (a catch-up round has none)."""

    @property
    def pair(self) -> tuple[str, str]:
        return self.tenant, self.job.name

    def merged(self, pending: Try) -> Try:
        """This try and one still pending for the pair as one: due at the earlier time, serving the later slot.

        A run that starts after both slots serves both; keeping only the newer try could drop a notification that
        came after the slot it replaces, and keeping only the later due time would hold back an urgent one. Two
        urgent tries are due when the newer one says: its owner chose that time knowing the older one (a burst of
        notifications waits until it has been quiet a moment, up to a bound; see :mod:`graphsync.notify.service`).
        """
        slots = [slot for slot in (self.slot, pending.slot) if slot is not None]
        both_urgent = self.urgent and pending.urgent
        notified = [time for time in (self.notified, pending.notified) if time is not None]
        return Try(
            self.job,
            self.tenant,
            self.not_before if both_urgent else min(self.not_before, pending.not_before),
            max(slots) if slots else None,
            self.urgent or pending.urgent,
            max(notified) if notified else None,
        )


class Delays(NamedTuple):
    """A try's delay past ``not_before``, in two parts fixed when it is queued."""

    fixed: float  # seconds, whatever the load
    scale: float  # seconds that the load share (Delay.load) is a share of


class Delay(Protocol):
    """What the owner adds to a try's ``not_before``: ``fixed + scale * load(runs in flight)``.

    Split so that choosing a try does not look at every pending one: ``of`` runs once per try, when it is queued,
    and tries with the same ``scale`` keep their order whatever the load, so one heap per scale holds them.
    """

    def of(self, attempt: Try) -> Delays: ...

    def load(self, in_flight: int) -> float: ...


class NoDelay:
    """``sync``'s delay: none, so pairs start in the order given."""

    def of(self, attempt: Try) -> Delays:
        return Delays(0.0, 0.0)

    def load(self, in_flight: int) -> float:
        return 0.0


@dataclass(order=True)
class _Queued:
    """A pending try in its scale's heap, ordered by when it comes due at no load, then by when it came."""

    key: float  # not_before + the fixed delay
    seq: int
    scale: float = field(compare=False)
    attempt: Try = field(compare=False)


class RunPool:
    """Pending tries and the workers that run them; see the module docstring for the rules.

    Pending tries wait in one heap per delay scale (a handful: one per job interval at most), so a worker's pass
    costs a few heap operations whatever the number pending. A try whose pair runs, or whose tenant holds
    ``per_tenant`` runs, is parked under its tenant when it reaches the top of its heap and pushed back when a run
    of that tenant ends; a replaced try stays in its heap until it reaches the top, then is dropped.
    """

    def __init__(
        self,
        run: Callable[[Try], None],
        *,
        concurrency: int,
        per_tenant: int,
        stop: threading.Event,
        delay: Delay | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "run",
    ) -> None:
        self._run = run
        self._per_tenant = per_tenant
        self._stop = stop
        self._delay = delay or NoDelay()
        self._clock = clock
        self._changed = threading.Condition()
        self._pending: dict[tuple[str, str], _Queued] = {}  # the one live entry of each pair
        self._heaps: dict[float, list[_Queued]] = {}  # scale -> tries that may start, maybe replaced ones
        # tenant -> pair -> the try that may not start until one of the tenant's runs ends (one per pair: a put while
        # it waits replaces it, so notifications during a long run park nothing more)
        self._parked: dict[str, dict[tuple[str, str], _Queued]] = {}
        self._seq = 0
        self._running: set[tuple[str, str]] = set()
        self._per_tenant_running: dict[str, int] = {}
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"{name} {index + 1}", daemon=True) for index in range(concurrency)
        ]

    def start(self) -> RunPool:
        for worker in self._workers:
            worker.start()
        return self

    @property
    def in_flight(self) -> int:
        with self._changed:
            return len(self._running)

    def put(self, attempt: Try) -> None:
        """Add a try; one still pending for the same pair is merged with it (:meth:`Try.merged`)."""
        with self._changed:
            if (pending := self._pending.get(attempt.pair)) is not None:
                attempt = attempt.merged(pending.attempt)  # the replaced entry is dropped when it tops its heap
            # Under the lock, so that two puts for one pair cannot both merge with the same pending try. The owner's
            # delay may take a lock of its own, but never calls into the pool while holding it.
            fixed, scale = self._delay.of(attempt)
            self._seq += 1
            queued = _Queued(attempt.not_before + fixed, self._seq, scale, attempt)
            self._pending[attempt.pair] = queued
            heapq.heappush(self._heaps.setdefault(scale, []), queued)
            self._changed.notify()  # any one idle worker can take it; it wakes the next if more are due

    def close(self) -> None:
        """No more tries will come: workers end once none is pending (``sync``: the invocation's pairs are in)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wake(self) -> None:
        """Let waiting workers see the stop event now rather than at their next poll."""
        with self._changed:
            self._changed.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every worker has ended (closed and drained, or stopped); ``False`` if some still run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)

    def running(self) -> list[tuple[str, str]]:
        """The pairs running now, for a report of what a stop left unfinished."""
        with self._changed:
            return sorted(self._running)

    def _work(self) -> None:
        while (attempt := self._take()) is not None:
            try:
                self._run(attempt)
            except Exception:  # a run must never take a worker down with it
                log.exception("run of %s/%s failed unexpectedly", attempt.tenant, attempt.job.name)
            finally:
                with self._changed:
                    self._running.discard(attempt.pair)
                    self._per_tenant_running[attempt.tenant] -= 1
                    for queued in self._parked.pop(attempt.tenant, {}).values():
                        heapq.heappush(self._heaps.setdefault(queued.scale, []), queued)

    def _take(self) -> Try | None:
        """The next try this worker may start, once it is due; ``None`` when the pool is stopped or drained."""
        with self._changed:
            while not self._stop.is_set():
                if self._closed and not self._pending:
                    self._changed.notify_all()  # drained: the idle workers end too
                    return None
                now = self._clock()
                best = self._first(self._delay.load(len(self._running)))
                if best is not None and best[0] <= now:
                    return self._start(heapq.heappop(self._heaps[best[1].scale]).attempt)
                wait = POLL_SECONDS if best is None else min(POLL_SECONDS, best[0] - now)
                self._changed.wait(wait)
            return None

    def _first(self, load: float) -> tuple[float, _Queued] | None:
        """The try that comes due first among those that may start, and when; it stays on top of its heap."""
        best: tuple[float, _Queued] | None = None
        for scale, heap in list(self._heaps.items()):
            while heap and not self._startable(heap[0]):
                heapq.heappop(heap)
            if not heap:
                del self._heaps[scale]
                continue
            due = heap[0].key + scale * load
            if best is None or (due, heap[0].seq) < (best[0], best[1].seq):
                best = due, heap[0]
        return best

    def _startable(self, queued: _Queued) -> bool:
        """Whether the try may start now; if not, a replaced one is forgotten and a blocked one parked."""
        attempt = queued.attempt
        if self._pending.get(attempt.pair) is not queued:
            return False
        if attempt.pair in self._running or self._per_tenant_running.get(attempt.tenant, 0) >= self._per_tenant:
            self._parked.setdefault(attempt.tenant, {})[attempt.pair] = queued
            return False
        return True

    def _start(self, attempt: Try) -> Try:
        del self._pending[attempt.pair]
        self._running.add(attempt.pair)
        self._per_tenant_running[attempt.tenant] = self._per_tenant_running.get(attempt.tenant, 0) + 1
        if self._pending:
            self._changed.notify()  # the next pending try may be due too: let another idle worker look
        return attempt


def exit_now(code: int) -> NoReturn:
    """Leave although some run is stuck inside one HTTP call (a hanging Graph, a long ``Retry-After``).

    Nothing half-written is visible: files and blobs are replaced atomically and the cursor is saved last, so the
    next run starts from the last saved link. Exiting normally would wait for the stuck thread instead.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
