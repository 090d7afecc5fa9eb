"""Who tries a pair first in a slot: its last runner, unless nobody is known, it is over its share, or loaded."""

from __future__ import annotations

from graphsync.affinity import LOAD_MAX, Affinity
from graphsync.config import JobSettings
from graphsync.pool import Try
from graphsync.schedule import head_start

USERS = JobSettings(name="users", resource="users", every="30s")
HEAD = head_start(USERS)


def delay(view: Affinity, attempt: Try, in_flight: int) -> float:
    """The whole delay the pool gives a try queued now, with ``in_flight`` runs (see graphsync.pool.Delay)."""
    fixed, scale = view.of(attempt)
    return fixed + scale * view.load(in_flight)


def test_nobody_known_means_every_replica_tries_at_the_slot_start() -> None:
    assert delay(Affinity("a"), Try(USERS, "t1"), 0) == 0


def test_the_last_runner_tries_first_and_the_others_a_head_start_later() -> None:
    a, b = Affinity("a"), Affinity("b")
    for replica in (a, b):
        replica.learn("users", "t1", "a")
        replica.learn("users", "t2", "b")
        replica.learn("users", "t2", None)  # a try that learned nothing changes nothing
    assert (delay(a, Try(USERS, "t1"), 0), delay(b, Try(USERS, "t1"), 0)) == (0, HEAD)
    assert (delay(a, Try(USERS, "t2"), 0), delay(b, Try(USERS, "t2"), 0)) == (HEAD, 0)
    assert b.last_runner("users", "t1") == "a"


def test_a_replica_over_its_share_keeps_the_first_try_for_its_share_only() -> None:
    # "a" started first and ran 9 of 12 pairs; "b" ran 3; "c" is new and has run nothing.
    views = {name: Affinity(name) for name in "abc"}
    tenants = [f"t{index:02d}" for index in range(12)]
    for view in views.values():
        for index, tenant in enumerate(tenants):
            view.learn("users", tenant, "a" if index < 9 else "b")
    a_first = {tenant for tenant in tenants if views["a"].first("users", tenant)}
    assert len(a_first) == 6, "share of 12 pairs between a and b, as a sees it"
    c_first = {tenant for tenant in tenants if views["c"].first("users", tenant)}
    assert len(c_first) == 12 - 4 - 3, "c counts itself: share 4; a keeps 4 of its 9, b its 3"
    assert not c_first & {tenant for tenant in tenants[9:]}


def test_load_delays_every_try_but_a_saturated_last_runner_still_tries_before_the_others() -> None:
    a, b = Affinity("a"), Affinity("b")
    for replica in (a, b):
        replica.learn("users", "t1", "a")
    assert 0 < delay(a, Try(USERS, "t2"), 4) < delay(a, Try(USERS, "t2"), 8)
    assert delay(a, Try(USERS, "t1"), 64) == HEAD * LOAD_MAX < delay(b, Try(USERS, "t1"), 0)


def test_a_notifications_urgent_try_waits_for_no_head_start_nor_load() -> None:
    b = Affinity("b")
    b.learn("users", "t1", "a")  # another replica ran it last: a slot's try would wait a head start
    assert delay(b, Try(USERS, "t1"), 3) > HEAD
    assert delay(b, Try(USERS, "t1", urgent=True), 3) == 0
