"""The working store's delta semantics, directly: members in their own table, partial merges, removals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from graphsync.snapshot import SnapshotStore, encode


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


def _model(objects: dict[str, dict], record: dict, defaults: dict) -> None:
    """Graph's delta semantics one record at a time, written independently of SnapshotStore."""
    if "@removed" in record:
        objects.pop(record["id"], None)
        return
    obj = objects.setdefault(record["id"], dict(defaults))
    for key, value in record.items():
        if key == "members@delta":
            members = set(obj.get("members") or ())
            for entry in value:
                (members.discard if "@removed" in entry else members.add)(entry["id"])
            obj["members"] = sorted(members)
        elif key == "manager@delta":
            current = [entry["id"] for entry in value if "@removed" not in entry]
            obj["manager"] = current[-1] if current else None
        else:
            obj[key] = value


def _record(rng: random.Random, ids: list[str]) -> dict:
    object_id = rng.choice(ids)
    kind = rng.randrange(6)
    if kind == 0:
        return {"id": object_id, "@removed": {"reason": rng.choice(["changed", "deleted"])}}
    record: dict = {"id": object_id}
    for name in rng.sample(["displayName", "mail", "jobTitle", "city"], rng.randrange(0, 4)):
        record[name] = rng.choice([None, "x", "é ✓", 3, True, 0.5, f"{name} {rng.randrange(9)}"])
    if kind == 1:
        record["members@delta"] = [
            {"id": rng.choice(ids), **({"@removed": {"reason": "deleted"}} if rng.random() < 0.3 else {})}
            for _ in range(rng.randrange(0, 4))
        ]
    if kind == 2:
        record["manager@delta"] = [
            {"id": rng.choice(ids), **({"@removed": {"reason": "deleted"}} if rng.random() < 0.3 else {})}
            for _ in range(rng.randrange(0, 3))
        ]
    return record


@pytest.mark.parametrize("defaults", [{}, {"manager": None}])
@pytest.mark.parametrize("with_lines", [False, True])
def test_pages_of_repeated_partial_and_removed_records_apply_as_one_record_at_a_time(
    tmp_path: Path, defaults: dict, with_lines: bool
) -> None:
    """Pages where an id comes several times (added, changed, removed, added again) give what applying each
    record in turn gives, with or without the change lines the store may reuse as stored text."""
    rng = random.Random(len(defaults) * 2 + with_lines)
    ids = [f"id-{n:02d}" for n in range(12)]
    store = SnapshotStore(tmp_path / "store.sqlite")
    expected: dict[str, dict] = {}
    for _ in range(60):
        page = [_record(rng, ids) for _ in range(rng.randrange(1, 15))]
        lines = [encode({"id": r["id"], "@removed": r["@removed"]} if "@removed" in r else r) for r in page]
        store.apply(page, defaults=defaults, lines=lines if with_lines else None)
        for record in page:
            _model(expected, record, defaults)
        assert _lines(store) == [expected[object_id] for object_id in sorted(expected)]
    assert b"".join(store.lines()) == b"".join(encode(expected[object_id]) for object_id in sorted(expected))
