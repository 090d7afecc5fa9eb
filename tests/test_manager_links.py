"""Manager links (`expand = ["manager"]`) through `graphsync sync`, against the HTTPS fake Graph.

The oracle is the fake's truth: every user's selected properties plus ``manager`` (the manager's id, or null).
A delta round's change file keeps ``manager@delta`` as Graph sent it; a full round must give the very same
snapshot bytes as the delta rounds before it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tests import test_sync
from tests.fakes.graph import FakeGraph, mutate, populate
from tests.test_sync import TENANT, USER_SELECT, USERS_JOB, Harness, MakeHarness, assert_same, parse_snapshot

# test_sync's fixtures, bound here so that pytest finds them for this module too.
make_harness = test_sync.make_harness
out_dir = test_sync.out_dir

MANAGER_JOB = {**USERS_JOB, "expand": ["manager"]}


def users_with_managers(fake: FakeGraph) -> dict[str, dict[str, Any]]:
    managers = fake.managers(TENANT)
    return {
        oid: {"id": oid, **{name: obj.get(name) for name in USER_SELECT}, "manager": managers.get(oid)}
        for oid, obj in fake.objects(TENANT, "users").items()
    }


def sync_and_compare(harness: Harness, fake: FakeGraph) -> list[dict[str, Any]]:
    """One run; the snapshot must equal the directory; returns the run's change lines."""
    before = set(harness.output.change_files("users"))
    harness.sync()
    assert_same(parse_snapshot(harness.output.snapshot("users")), users_with_managers(fake), "users vs directory")
    files = harness.output.change_files("users")
    new = sorted(files.keys() - before)
    assert len(new) <= 1
    return [json.loads(line) for line in files[new[0]].splitlines()] if new else []


def test_manager_set_changed_and_removed_across_delta_rounds_and_a_full_round_gives_the_same_snapshot(
    make_harness: MakeHarness, fake_graph: FakeGraph, out_dir: Path
) -> None:
    harness = make_harness(MANAGER_JOB)
    populate(fake_graph, TENANT, users=300, groups=0, seed=21)
    users = list(fake_graph.objects(TENANT, "users"))
    for index in range(1, 60):
        fake_graph.set_manager(TENANT, users[index], users[index // 10])
    fake_graph.page_size = 37

    first = sync_and_compare(harness, fake_graph)
    assert len(first) == 300 and sum("manager@delta" in line for line in first) == 59
    snapshot = parse_snapshot(harness.output.snapshot("users"))
    assert snapshot[users[100]]["manager"] is None, "a user without a manager says so"

    fake_graph.set_manager(TENANT, users[100], users[0])  # set
    fake_graph.set_manager(TENANT, users[11], users[2])  # changed
    fake_graph.set_manager(TENANT, users[12], None)  # removed
    fake_graph.add(TENANT, "users", {"id": "new-with-manager", "displayName": "New", "manager": users[0]})
    fake_graph.add(TENANT, "users", {"id": "new-without", "displayName": "Newer"})
    mutate(fake_graph, TENANT, random.Random(22), changes=15)
    lines = {line["id"]: line for line in sync_and_compare(harness, fake_graph)}
    removal = {"@odata.type": "#microsoft.graph.user", "id": users[1], "@removed": {"reason": "deleted"}}
    assert lines[users[12]]["manager@delta"] == [removal], "kept as Graph sent it"
    assert lines[users[100]]["manager@delta"] == [{"@odata.type": "#microsoft.graph.user", "id": users[0]}]
    snapshot = parse_snapshot(harness.output.snapshot("users"))
    assert (snapshot[users[100]]["manager"], snapshot[users[11]]["manager"]) == (users[0], users[2])
    assert snapshot[users[12]]["manager"] is None and snapshot["new-without"]["manager"] is None

    fake_graph.set_manager(TENANT, "new-with-manager", users[5])
    fake_graph.set_manager(TENANT, users[100], None)
    sync_and_compare(harness, fake_graph)
    after_delta = harness.output.snapshot("users")

    (out_dir / TENANT / "users" / "state.json").unlink()  # no delta link: the next run is a full round
    full = sync_and_compare(harness, fake_graph)
    assert len(full) == len(users_with_managers(fake_graph))
    assert harness.output.snapshot("users") == after_delta, (
        "a full round gives the delta rounds' snapshot, byte for byte"
    )
