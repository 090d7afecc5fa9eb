"""The reconciliation's comparison and the log cursor's bookkeeping and filters, directly (no Graph, no processes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from graphsync.config import JobSettings
from graphsync.logrounds import Backlog, LogCursor, _advance, cursor_applies, log_select, time_window
from graphsync.reconcile import compare
from graphsync.snapshot import encode
from graphsync.timestamps import TICKS_PER_SECOND, graph_ticks, graph_time


def lines(*objects: dict[str, object]) -> list[bytes]:
    return [encode(obj) for obj in objects]


def test_compare_counts_each_kind_of_drift_with_the_first_ids() -> None:
    before = lines(
        {"id": "a", "n": 1},
        {"id": "b", "n": 1},
        {"id": "g", "members": ["u1", "u2", "u3"]},
        {"id": "h", "members": ["u1"], "n": 1},
    )
    after = lines(
        {"id": "a", "n": 1},
        {"id": "c", "n": 1},
        {"id": "g", "members": ["u2", "u4"]},
        {"id": "h", "members": ["u1"], "n": 2},
    )

    drift = compare(before, ((json.loads(line)["id"], line) for line in after))

    assert drift.counts == {"missing": 1, "extra": 1, "different": 1, "member_missing": 1, "member_extra": 2}
    assert drift.as_state()["first_ids"] == {
        "missing": ["c"],
        "extra": ["b"],
        "different": ["h"],
        "member_missing": ["g"],
        "member_extra": ["g"],
    }
    assert compare(before, ((obj, line) for obj, line in zip("abgh", before, strict=True))).total == 0


T = int(datetime(2026, 5, 1, 12, tzinfo=UTC).timestamp()) * TICKS_PER_SECOND  # Graph's 100-ns ticks
HOUR = 3600 * TICKS_PER_SECOND


def test_a_complete_window_moves_the_cursor_to_its_newest_record_and_forgets_ids_behind_the_overlap() -> None:
    previous = LogCursor(T)
    seen = {"old": T - HOUR // 2, "inside": T + HOUR // 2, "new": T + HOUR}  # the new horizon: T

    cursor = _advance(previous, seen, True, T - 2 * HOUR, T + HOUR, HOUR, T - HOUR)

    assert (cursor.time, cursor.backlog) == (T + HOUR, None)
    assert set(cursor.seen) == {"inside", "new"}


def test_an_unfinished_window_keeps_the_cursor_and_remembers_only_ids_a_later_window_can_return() -> None:
    previous = LogCursor(T)
    seen = {"overlap": T - HOUR // 2, "between": T + HOUR, "boundary": T + 2 * HOUR, "top": T + 5 * HOUR}

    cursor = _advance(previous, seen, False, T + 2 * HOUR, T + 5 * HOUR, HOUR, T - HOUR)

    assert cursor.time == T and cursor.backlog == Backlog(until=T + 2 * HOUR, top=T + 5 * HOUR, lower=T - HOUR)
    assert set(cursor.seen) == {"overlap", "boundary", "top"}
    done = _advance(cursor, cursor.seen | {"rest": T + HOUR}, True, T - HOUR, T + 2 * HOUR, HOUR, T - HOUR)
    assert (done.time, done.backlog, set(done.seen)) == (T + 5 * HOUR, None, {"top"})


def test_graph_times_keep_their_100_ns_ticks_both_ways() -> None:
    assert graph_time(graph_ticks("2026-05-01T12:00:00.1234567Z")) == "2026-05-01T12:00:00.1234567Z"
    assert graph_ticks("2026-05-01T12:00:00.1234563Z") < graph_ticks("2026-05-01T12:00:00.1234567Z")
    assert graph_ticks("2026-05-01T14:00:00+02:00") == T
    assert graph_ticks("2026-05-01T12:00:00.12345671Z") == graph_ticks("2026-05-01T12:00:00.1234568Z"), "rounds up"
    assert graph_time(T) == "2026-05-01T12:00:00.0000000Z"


def test_strict_time_filters_are_exactly_the_inclusive_window_one_tick_outside() -> None:
    assert time_window("auditLogs/signIns", "createdDateTime", T, T + HOUR) == (
        "createdDateTime ge 2026-05-01T12:00:00.0000000Z and createdDateTime le 2026-05-01T13:00:00.0000000Z"
    )
    assert time_window("auditLogs/provisioning", "activityDateTime", T, T + HOUR) == (
        "activityDateTime gt 2026-05-01T11:59:59.9999999Z and activityDateTime lt 2026-05-01T13:00:00.0000001Z"
    )


def test_a_log_cursor_belongs_to_its_resource_and_time_property_not_to_select() -> None:
    job = JobSettings(name="s", resource="auditLogs/signIns", cursor="createdDateTime", every="5m", select=["appId"])
    saved = {"resource": "auditLogs/signIns", "cursor": "createdDateTime", "select": ["other"], "delta": False}
    assert cursor_applies(saved, job)
    assert not cursor_applies({**saved, "cursor": "activityDateTime"}, job)
    assert not cursor_applies(None, job)
    assert log_select(job) == ["appId", "id", "createdDateTime"]
