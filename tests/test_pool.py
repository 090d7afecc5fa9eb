"""The bounded pool of runs: bounds, order, coalescing and stop, with a stand-in for the run itself."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import ClassVar

from graphsync.config import JobSettings
from graphsync.pool import Delays, RunPool, Try

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


def test_two_urgent_tries_are_due_when_the_newer_says_so_a_burst_waits_until_it_is_quiet() -> None:
    """The notification service moves a burst's round on with each notification (up to a bound it keeps): the
    newer urgent try's time wins, whichever is earlier, and it serves the latest notification."""
    first = Try(USERS, "a", not_before=101.0, slot=100.0, urgent=True)
    later = Try(USERS, "a", not_before=101.8, slot=100.8, urgent=True)
    assert later.merged(first) == Try(USERS, "a", 101.8, 100.8, urgent=True)
    catch_up = Try(USERS, "a", not_before=100.9, slot=100.9, urgent=True)  # `missed`: due at once
    assert catch_up.merged(later) == Try(USERS, "a", 100.9, 100.9, urgent=True)


def test_a_merged_try_keeps_the_latest_notification_it_serves() -> None:
    first = Try(USERS, "a", not_before=101.0, slot=100.0, urgent=True, notified=100.0)
    second = Try(USERS, "a", not_before=103.0, slot=102.0, urgent=True, notified=102.0)
    catch_up = Try(USERS, "a", not_before=104.0, slot=104.0, urgent=True)

    assert first.merged(second).notified == second.merged(first).notified == 102.0
    assert catch_up.merged(first).notified == 100.0, "a catch-up round has no notification of its own"
    assert Try(USERS, "a").merged(catch_up).notified is None


class PerRunInFlight:
    """A delay of ``seconds`` per run in flight, counting what the pool asks of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.queued = 0
        self.loads: list[int] = []

    def of(self, attempt: Try) -> Delays:
        self.queued += 1
        return Delays(0.0, self.seconds)

    def load(self, in_flight: int) -> float:
        self.loads.append(in_flight)
        return in_flight


def test_a_try_waits_for_its_time_plus_the_delay_for_the_runs_in_flight() -> None:
    run = Recorder(seconds=0.5)
    delay = PerRunInFlight(0.3)
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
    assert 1 in delay.loads
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


class Watched(Try):
    """A try that counts how often the pool looks at it (every rule the pool checks starts from its pair)."""

    looks: ClassVar[int] = 0

    @property
    def pair(self) -> tuple[str, str]:
        Watched.looks += 1
        return super().pair


def picks_cost(pending: int, picks: int = 20) -> tuple[int, int, int]:
    """Queue ``pending`` tries due in an hour and ``picks`` due now; let one worker take the due ones.

    Returns how often the delay was asked (when queueing, and per pass) and how often a try was looked at, while
    the worker took the due tries.
    """
    delay = PerRunInFlight(0.0)
    taken = threading.Event()
    ran: list[Try] = []
    at_last_pick: list[tuple[int, int]] = []

    def run(attempt: Try) -> None:
        ran.append(attempt)
        if len(ran) == picks:
            at_last_pick.append((len(delay.loads), Watched.looks))
            taken.set()

    stop = threading.Event()
    pool = RunPool(run, concurrency=1, per_tenant=1, stop=stop, delay=delay)
    later = time.time() + 3600
    for index in range(pending):
        pool.put(Watched(USERS if index % 2 else GROUPS, f"later{index}", not_before=later))
    for index in range(picks):
        pool.put(Watched(USERS, f"now{index}"))
    Watched.looks = 0
    pool.start()
    assert taken.wait(timeout=10)
    stop.set()
    pool.wake()
    assert pool.join(timeout=5)
    assert [attempt.tenant for attempt in ran] == [f"now{index}" for index in range(picks)]
    passes, looks = at_last_pick[0]
    return delay.queued, passes, looks


def test_choosing_a_try_costs_the_same_with_ten_or_a_thousand_tries_pending() -> None:
    """Structural, not timed: the delay is worked out once per try when it is queued, each pass asks only for the
    load share, and a pass looks at the few tries on top of its heaps, never at every pending one."""
    few, many = picks_cost(10), picks_cost(1000)
    assert few[0] == 10 + 20 and many[0] == 1000 + 20, "the delay of each try is worked out once, when queued"
    assert few[1] == many[1] == 20, "one load question per pass, one pass per pick"
    assert few[2] == many[2] <= 20 * 5, "the tries looked at per pick do not grow with the pending ones"


class Constant:
    """A delay of ``fixed`` plus half of ``scale``, per job name, whatever the runs in flight."""

    def __init__(self, delays: dict[str, Delays]) -> None:
        self.delays = delays

    def of(self, attempt: Try) -> Delays:
        return self.delays[attempt.job.name]

    def load(self, in_flight: int) -> float:
        return 0.5


def test_tries_whose_delays_scale_differently_start_in_the_order_of_their_whole_delay() -> None:
    # groups: due at 10 + 0.5; users: at 10 + 2 * 0.5 = 11; devices: at 9 + 4 * 0.5 = 11 too, but queued later.
    delay = Constant({"users": Delays(0.0, 2.0), "groups": Delays(0.5, 0.0), "devices": Delays(0.0, 4.0)})
    run = Recorder(seconds=0)
    pool = RunPool(run, concurrency=1, per_tenant=1, stop=threading.Event(), delay=delay, clock=lambda: 100.0)
    pool.put(Try(USERS, "a", not_before=10.0))
    pool.put(Try(GROUPS, "a", not_before=10.0))
    pool.put(Try(JobSettings(name="devices", resource="devices", every="1h"), "b", not_before=9.0))
    pool.close()
    pool.start()
    assert pool.join(timeout=10)
    assert run.ran == [("a", "groups"), ("a", "users"), ("b", "devices")]


def test_puts_for_a_pair_waiting_on_its_busy_tenant_keep_one_parked_try_and_run_it_once() -> None:
    """Notifications during a long run put the same pair again and again: the pool holds one try for it, not one per
    put, and the pair runs once after the tenant's run ends."""
    stop = threading.Event()
    release = threading.Event()
    ran: list[tuple[str, str]] = []

    def run(attempt: Try) -> None:
        ran.append(attempt.pair)
        if attempt.job is GROUPS:
            release.wait(10)

    pool = RunPool(run, concurrency=2, per_tenant=1, stop=stop).start()
    pool.put(Try(GROUPS, "t"))
    deadline = time.monotonic() + 5
    while not pool.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(500):
        pool.put(Try(USERS, "t"))
        pool.wake()
    time.sleep(0.3)  # workers look at the heap and park what they cannot start
    assert sum(len(parked) for parked in pool._parked.values()) <= 1
    release.set()
    pool.close()
    assert pool.join(10)
    assert ran == [("t", "groups"), ("t", "users")]
