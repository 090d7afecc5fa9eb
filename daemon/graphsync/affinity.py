"""Which replica tries a (tenant, job) first in a slot: the one that ran it last, unless it is loaded.

The replica that ran a pair last holds its working store warm (no download, no load), so it gets the first try
at the slot; the others try a head start later (:func:`graphsync.schedule.head_start`), by when it has usually
served the slot and they skip after one state read. If it is dead, they take over after the head start, and the
one that does becomes the pair's last runner: a dead replica costs one refresh of each of its stores.

Nothing extra is stored or exchanged. Every try tells this replica who ran the pair: itself when it ran it; the
lease holder named in the lock blob's metadata when the pair was busy; the ``replica`` in ``state.json`` when the
slot was already served. Each replica tries every pair each slot, so what it knows is at most a slot old.

Two rules keep affinity from holding work back or pinning it to whoever started first:

- **load**: every try waits a little more per run this replica has in flight, so an idle replica's tries come
  due before a busy one's;
- **share**: a replica that last ran more of a job's pairs than its share (the job's pairs over the replicas
  known, counting this one) keeps the first try only for its share; for the rest, the other replicas try at the
  slot's start and the last runner a head start later, so those pairs move to a less loaded replica. Which pairs
  are within the share is decided by a hash of the pair. Replicas that know of different numbers of replicas
  compute different shares for a while; a pair is then at worst tried a head start late, never twice.
"""

from __future__ import annotations

import hashlib
import math
import threading
from typing import TYPE_CHECKING

from graphsync.pool import Delays
from graphsync.schedule import head_start

if TYPE_CHECKING:
    from graphsync.pool import Try

LOAD_STEP = 0.05  # of the head start, per run in flight
LOAD_MAX = 0.5  # a saturated replica still tries its own pairs before the others try them


class Affinity:
    """What this replica (``me``) learned about who ran each pair last, and the delay of its tries from it."""

    def __init__(self, me: str) -> None:
        self._me = me
        self._lock = threading.Lock()
        self._runners: dict[str, dict[str, str]] = {}  # job -> tenant -> replica that ran it last
        self._within: dict[str, frozenset[str]] = {}  # job -> tenants whose runner is within its share (a cache)

    def learn(self, job: str, tenant: str, runner: str | None) -> None:
        """Record what a try found out; ``None`` (nothing learned) keeps what was known."""
        if runner is None:
            return
        with self._lock:
            runners = self._runners.setdefault(job, {})
            if runners.get(tenant) != runner:
                runners[tenant] = runner
                self._within.pop(job, None)

    def last_runner(self, job: str, tenant: str) -> str | None:
        with self._lock:
            return self._runners.get(job, {}).get(tenant)

    def first(self, job: str, tenant: str) -> bool:
        """Whether this replica tries the pair at the slot's start rather than a head start later."""
        with self._lock:
            runner = self._runners.get(job, {}).get(tenant)
            if runner is None:
                return True  # nobody known: everyone tries at once, and the lease decides
            within = tenant in self._within_share(job)
        return within if runner == self._me else not within

    def of(self, attempt: Try) -> Delays:
        """The daemon's :class:`graphsync.pool.Delay`: a head start unless first, plus the load share of a head start.

        Worked out once, when the slot queues the try: what a run learns later in the slot counts from the next slot
        on, as what a replica knows is a slot old anyway. None for an urgent try (a change notification): whichever
        replica got the notification runs it now.
        """
        if attempt.urgent:
            return Delays(0.0, 0.0)
        head = head_start(attempt.job)
        return Delays(0.0 if self.first(attempt.job.name, attempt.tenant) else head, head)

    def load(self, in_flight: int) -> float:
        return min(LOAD_STEP * in_flight, LOAD_MAX)

    def _within_share(self, job: str) -> frozenset[str]:
        """The tenants of ``job`` whose last runner keeps the first try. Call under the lock."""
        cached = self._within.get(job)
        if cached is not None:
            return cached
        runners = self._runners.get(job, {})
        by_runner: dict[str, list[str]] = {}
        for tenant, runner in runners.items():
            by_runner.setdefault(runner, []).append(tenant)
        replicas = len(by_runner.keys() | {self._me})
        share = math.ceil(len(runners) / replicas)
        within = frozenset(
            tenant
            for tenants in by_runner.values()
            for tenant in sorted(tenants, key=lambda tenant: _rank(job, tenant))[:share]
        )
        self._within[job] = within
        return within


def _rank(job: str, tenant: str) -> bytes:
    """A stable order of a job's pairs that every replica computes alike (Python's ``hash`` is salted)."""
    return hashlib.blake2b(f"{tenant}/{job}".encode(), digest_size=8).digest()
