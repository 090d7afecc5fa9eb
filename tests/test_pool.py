"""The bounded pool of runs: bounds, order, coalescing and stop, with a stand-in for the run itself."""

from __future__ import annotations

import threading
import time
from collections import Counter

from graphsync.config import JobSettings
from graphsync.pool import RunPool, Try

USERS = JobSettings(name="users", resource="users", every="1h")
GROUPS = JobSettings(name="groups", resource="groups", every="1h")


class Recorder:
    """A run that takes ``seconds`` and records what ran, and the most runs at once, overall and per tenant."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.ran: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._now: Counter[str] = Counter()
        self.most: Counter[str] = Counter()

    def __call__(self, attempt: Try) -> None:
        with self._lock:
            self.ran.append(attempt.pair)
            for key in (attempt.tenant, "*"):
                self._now[key] += 1
                self.most[key] = max(self.most[key], self._now[key])
        time.sleep(self.seconds)
        with self._lock:
            for key in (attempt.tenant, "*"):
                self._now[key] -= 1


def test_every_try_runs_once_within_concurrency_and_per_tenant() -> None:
    run = Recorder()
    pool = RunPool(run, concurrency=4, per_tenant=2, stop=threading.Event())
    pairs = [
        (job, f"t{index}")
        for index in range(5)
        for job in (USERS, GROUPS, JobSettings(name="x", resource="x", every="1h"))
    ]
    for job, tenant in pairs:
        pool.put(Try(job, tenant))
    pool.close()
    pool.start()
    assert pool.join(timeout=10)
    assert sorted(run.ran) == sorted((tenant, job.name) for job, tenant in pairs)
    assert run.most["*"] == 4
    assert max(count for key, count in run.most.items() if key != "*") == 2


def test_one_worker_runs_the_tries_in_the_order_given() -> None:
    run = Recorder(seconds=0)
    pool = RunPool(run, concurrency=1, per_tenant=1, stop=threading.Event())
    order = [(job, tenant) for job in (USERS, GROUPS) for tenant in ("b", "a", "c")]
    for job, tenant in order:
        pool.put(Try(job, tenant))
    pool.close()
    pool.start()
    assert pool.join(timeout=10)
    assert run.ran == [(tenant, job.name) for job, tenant in order]


def test_a_pending_try_merges_with_a_later_one_and_a_running_pair_waits() -> None:
    run = Recorder(seconds=0.3)
    pool = RunPool(run, concurrency=2, per_tenant=2, stop=threading.Event()).start()
    pool.put(Try(USERS, "a"))
    time.sleep(0.1)  # running now
    pool.put(Try(USERS, "a", not_before=1.0))
    pool.put(Try(USERS, "a", not_before=2.0))  # merges with the pending one
    time.sleep(0.1)
    assert run.ran == [("a", "users")], "the same pair never runs twice at once"
    pool.close()
    assert pool.join(timeout=10)
    assert run.ran == [("a", "users"), ("a", "users")]


def test_a_merged_try_comes_due_at_the_earlier_time_and_serves_the_later_slot() -> None:
    """A notification's urgent try (slot: when it came) and a slot's try for the same pair must not lose either:
    the run comes as early as the urgent one asks and must start after both."""
    urgent = Try(USERS, "a", not_before=101.0, slot=100.5, urgent=True)
    scheduled = Try(USERS, "a", not_before=130.0, slot=90.0)

    assert scheduled.merged(urgent) == Try(USERS, "a", 101.0, 100.5, urgent=True)
    assert urgent.merged(scheduled) == Try(USERS, "a", 101.0, 100.5, urgent=True)
    assert Try(USERS, "a").merged(Try(USERS, "a", 5.0)) == Try(USERS, "a", 0.0, None)


def test_a_try_waits_for_its_time_plus_the_delay_for_the_runs_in_flight() -> None:
    run = Recorder(seconds=0.5)
    seen: list[int] = []

    def delay(attempt: Try, in_flight: int) -> float:
        seen.append(in_flight)
        return 0.3 * in_flight

    pool = RunPool(run, concurrency=2, per_tenant=2, stop=threading.Event(), delay=delay).start()
    started = time.time()
    pool.put(Try(USERS, "a", not_before=started + 0.2))
    time.sleep(0.25)
    assert run.ran == [("a", "users")]
    pool.put(Try(USERS, "b", not_before=time.time()))  # due now, but one run is in flight: 0.3 s later
    time.sleep(0.15)
    assert run.ran == [("a", "users")]
    time.sleep(0.3)
    assert run.ran == [("a", "users"), ("b", "users")]
    assert 1 in seen
    pool.close()
    assert pool.join(timeout=10)


def test_stop_drops_pending_tries_and_ends_workers_after_their_run() -> None:
    run = Recorder(seconds=0.3)
    stop = threading.Event()
    pool = RunPool(run, concurrency=2, per_tenant=2, stop=stop).start()
    for tenant in "abcdef":
        pool.put(Try(USERS, tenant))
    time.sleep(0.1)
    stop.set()
    pool.wake()
    assert pool.join(timeout=2)
    assert run.ran == [("a", "users"), ("b", "users")]
