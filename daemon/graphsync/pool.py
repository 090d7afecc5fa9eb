"""The bounded pool every (tenant, job) run goes through, in ``sync`` and in the daemon: ``[run]`` concurrency.

A fixed number of worker threads (``concurrency``) take pending tries one at a time. A worker takes the try that is
due first among those it may start: at most ``per_tenant`` runs of one tenant at once (Graph throttles per app and
tenant, so a big or throttled tenant holds at most that many workers and delays nobody else), and never a second
run of a pair that is running. Tries become due at their ``not_before`` time plus a delay the owner chooses from
the runs in flight (the daemon's load and affinity delays); ``sync`` uses none, so its pairs start in the order
given, and with one worker exactly one after the other.

The pool knows nothing of what a run does: :class:`Try` carries the job and tenant to the ``run`` callable, which
must not raise (an exception is logged and the worker goes on).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

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

    @property
    def pair(self) -> tuple[str, str]:
        return self.tenant, self.job.name

    def merged(self, pending: Try) -> Try:
        """This try and one still pending for the pair as one: due at the earlier time, serving the later slot.

        A run that starts after both slots serves both; keeping only the newer try could drop a notification that
        came after the slot it replaces, and keeping only the later due time would hold back an urgent one.
        """
        slots = [slot for slot in (self.slot, pending.slot) if slot is not None]
        return Try(
            self.job,
            self.tenant,
            min(self.not_before, pending.not_before),
            max(slots) if slots else None,
            self.urgent or pending.urgent,
        )


Delay = Callable[[Try, int], float]
"""Seconds to add to a try's ``not_before``, given how many runs this pool has in flight."""


def no_delay(attempt: Try, in_flight: int) -> float:
    return 0.0


class RunPool:
    """Pending tries and the workers that run them; see the module docstring for the rules."""

    def __init__(
        self,
        run: Callable[[Try], None],
        *,
        concurrency: int,
        per_tenant: int,
        stop: threading.Event,
        delay: Delay = no_delay,
        clock: Callable[[], float] = time.time,
        name: str = "run",
    ) -> None:
        self._run = run
        self._per_tenant = per_tenant
        self._stop = stop
        self._delay = delay
        self._clock = clock
        self._changed = threading.Condition()
        self._pending: dict[tuple[str, str], Try] = {}  # insertion order breaks ties between tries due together
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
            if (pending := self._pending.pop(attempt.pair, None)) is not None:
                attempt = attempt.merged(pending)
            self._pending[attempt.pair] = attempt
            self._changed.notify_all()

    def close(self) -> None:
        """No more tries will come: workers end once none is pending (``sync``: the invocation's pairs are in)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wake(self) -> None:
        """Let waiting workers see the stop event (or a changed delay) now rather than at their next poll."""
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
                    self._changed.notify_all()

    def _take(self) -> Try | None:
        """The next try this worker may start, once it is due; ``None`` when the pool is stopped or drained."""
        with self._changed:
            while not self._stop.is_set():
                if self._closed and not self._pending:
                    return None
                now = self._clock()
                in_flight = len(self._running)
                best: Try | None = None
                best_due = 0.0
                for attempt in self._pending.values():
                    if attempt.pair in self._running or self._per_tenant_running.get(attempt.tenant, 0) >= (
                        self._per_tenant
                    ):
                        continue
                    due = attempt.not_before + self._delay(attempt, in_flight)
                    if best is None or due < best_due:
                        best, best_due = attempt, due
                if best is not None and best_due <= now:
                    del self._pending[best.pair]
                    self._running.add(best.pair)
                    self._per_tenant_running[best.tenant] = self._per_tenant_running.get(best.tenant, 0) + 1
                    return best
                wait = POLL_SECONDS if best is None else min(POLL_SECONDS, best_due - now)
                self._changed.wait(wait)
            return None


def exit_now(code: int) -> NoReturn:
    """Leave although some run is stuck inside one HTTP call (a hanging Graph, a long ``Retry-After``).

    Nothing half-written is visible: files and blobs are replaced atomically and the cursor is saved last, so the
    next run starts from the last saved link. Exiting normally would wait for the stuck thread instead.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
