"""The working store's delta semantics, directly: members in their own table, partial merges, removals."""

from __future__ import annotations

import json
from pathlib import Path

from graphsync.snapshot import SnapshotStore


def _lines(store: SnapshotStore) -> list[dict]:
    return [json.loads(line) for line in store.lines()]


def test_members_survive_a_round_trip_through_the_published_snapshot(tmp_path: Path) -> None:
    first = SnapshotStore(tmp_path / "one.sqlite")
    first.apply(
        [
            {"id": "g", "displayName": "G", "members@delta": [{"id": "b"}, {"id": "a"}]},
            {"id": "g", "members@delta": [{"id": "c"}]},  # the same group, split over records
            {"id": "e", "displayName": "Empty", "members@delta": []},
            {"id": "u", "displayName": "U"},
        ]
    )
    published = list(first.lines())
    assert _lines(first) == [
        {"displayName": "Empty", "id": "e", "members": []},
        {"displayName": "G", "id": "g", "members": ["a", "b", "c"]},
        {"displayName": "U", "id": "u"},
    ]
    second = SnapshotStore(tmp_path / "two.sqlite")
    second.load(published)
    second.apply(
        [
            {"id": "g", "members@delta": [{"id": "a", "@removed": {"reason": "deleted"}}, {"id": "d"}]},
            {"id": "g", "displayName": None},  # a partial update: null clears, members stay
            {"id": "u", "@removed": {"reason": "changed"}},
        ]
    )
    assert _lines(second) == [
        {"displayName": "Empty", "id": "e", "members": []},
        {"displayName": None, "id": "g", "members": ["b", "c", "d"]},
    ]
    second.apply(
        [
            {"id": "u", "displayName": "U again"},
            {"id": "g", "@removed": {"reason": "deleted"}},
            {"id": "g", "displayName": "G2", "members@delta": []},
        ]
    )  # deleted, then back: no old members
    assert _lines(second)[1:] == [
        {"displayName": "G2", "id": "g", "members": []},
        {"displayName": "U again", "id": "u"},
    ]


def test_manager_delta_sets_changes_and_clears_manager_and_new_objects_get_the_defaults(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "users.sqlite")
    manager = {"manager": None}
    store.apply([{"id": "a", "manager@delta": [{"id": "m1"}]}, {"id": "b", "displayName": "B"}], defaults=manager)
    store.apply([{"id": "a", "manager@delta": [{"id": "m2"}]}, {"id": "c", "displayName": "C"}], defaults=manager)
    assert _lines(store) == [
        {"id": "a", "manager": "m2"},
        {"displayName": "B", "id": "b", "manager": None},
        {"displayName": "C", "id": "c", "manager": None},
    ]
    store.apply([{"id": "a", "manager@delta": [{"id": "m2", "@removed": {"reason": "deleted"}}]}, {"id": "b"}])
    assert _lines(store)[:2] == [{"id": "a", "manager": None}, {"displayName": "B", "id": "b", "manager": None}]
