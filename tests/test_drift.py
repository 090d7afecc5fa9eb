"""The reconciliation's comparison and the log cursor's bookkeeping, directly (no Graph, no processes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from graphsync.logrounds import Backlog, LogCursor, _advance
from graphsync.reconcile import compare
from graphsync.snapshot import encode


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


T = datetime(2026, 5, 1, 12, tzinfo=UTC)
HOUR = timedelta(hours=1)


def test_a_complete_window_moves_the_cursor_to_its_newest_record_and_forgets_ids_behind_the_overlap() -> None:
    previous = LogCursor(T)
    seen = {"old": T - HOUR / 2, "inside": T + HOUR / 2, "new": T + HOUR}  # the new horizon: T

    cursor = _advance(previous, seen, True, T - 2 * HOUR, T + HOUR, HOUR)

    assert (cursor.time, cursor.backlog) == (T + HOUR, None)
    assert set(cursor.seen) == {"inside", "new"}


def test_an_unfinished_window_keeps_the_cursor_and_remembers_only_ids_a_later_window_can_return() -> None:
    previous = LogCursor(T)
    seen = {"overlap": T - HOUR / 2, "between": T + HOUR, "boundary": T + 2 * HOUR, "top": T + 5 * HOUR}

    cursor = _advance(previous, seen, False, T + 2 * HOUR, T + 5 * HOUR, HOUR)

    assert cursor.time == T and cursor.backlog == Backlog(until=T + 2 * HOUR, top=T + 5 * HOUR)
    assert set(cursor.seen) == {"overlap", "boundary", "top"}
    done = _advance(cursor, cursor.seen | {"rest": T + HOUR}, True, T - HOUR, T + 2 * HOUR, HOUR)
    assert (done.time, done.backlog, set(done.seen)) == (T + 5 * HOUR, None, {"top"})
