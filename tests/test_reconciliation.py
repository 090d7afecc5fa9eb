"""Drift reconciliation through real processes, against the HTTPS fake Graph and Azurite.

The fake's delta is made to "forget" changes (``silently=True``): an object added, one deleted, one changed, and
member links added and removed. Delta rounds never see them; the reconciling full round must find each one,
count it per kind (log, ``state.json``, ``graphsync_reconcile_drift_objects``) and correct the snapshot.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from graphsync.timestamps import epoch, iso_utc
from tests import test_sync
from tests.fakes.azurite import free_port
from tests.fakes.graph import FakeGraph, populate
from tests.test_sync import (
    GROUPS_JOB,
    TENANT,
    USERS_JOB,
    DirectoryOutput,
    Harness,
    assert_same,
    parse_snapshot,
    truth,
    write_config,
)

if TYPE_CHECKING:
    from tests.conftest import RunGraphsync, StartGraphsync, WriteConfig

out_dir = test_sync.out_dir  # test_sync's fixture, bound here so that pytest finds it for this module too

WEEK = 7 * 24 * 3600


def gauge(port: int, name: str, **labels: str) -> float | None:
    """A gauge's value for TENANT and ``labels``, or None while it is not exposed (or the server not up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    selector = ",".join(f'{key}="{value}"' for key, value in sorted({**labels, "tenant": TENANT}.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{selector}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def drift_metric(port: int, job: str, kind: str) -> float | None:
    return gauge(port, "graphsync_reconcile_drift_objects", job=job, kind=kind)


def make_due(out_dir: Path, job: str) -> dict[str, Any]:
    """Age the job's state as if its last full round and last run were a week ago; return the state."""
    path = out_dir / TENANT / job / "state.json"
    state = json.loads(path.read_bytes())
    assert "reconciliation" not in state, "no reconciliation yet"
    state["last_full_round"] = state["last_success_started"] = iso_utc(time.time() - WEEK)
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return state


def test_reconciliation_finds_drift_delta_forgot_counts_it_and_corrects_the_snapshot(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    run_graphsync: RunGraphsync,
    start_graphsync: StartGraphsync,
    out_dir: Path,
) -> None:
    port = free_port()
    jobs = [{**USERS_JOB, "every": "1h"}, {**GROUPS_JOB, "every": "1h"}]
    config = write_config(
        graphsync_config, fake_graph, jobs=jobs, output={"directory": str(out_dir)}, metrics={"port": port}
    )
    harness = Harness(
        fake_graph, run_graphsync, config, DirectoryOutput(out_dir), {"users": "users", "groups": "groups"}
    )
    populate(fake_graph, TENANT, users=400, groups=40, seed=31)
    harness.sync_and_check(full=True)

    users = list(fake_graph.objects(TENANT, "users"))
    groups = fake_graph.objects(TENANT, "groups")
    big = sorted(groups, key=lambda gid: len(groups[gid]["members"]))[-1]
    small = sorted(groups, key=lambda gid: len(groups[gid]["members"]))[-2]
    newcomer = next(uid for uid in users if uid not in groups[small]["members"])
    fake_graph.add(TENANT, "users", {"id": "ffffffff-ghost", "displayName": "Ghost"}, silently=True)  # missing
    fake_graph.delete(TENANT, "users", users[0], soft=False, silently=True)  # extra
    fake_graph.silently_change(TENANT, "users", users[1], jobTitle="Changed In Secret")  # different
    fake_graph.remove_members(TENANT, big, groups[big]["members"][:2], silently=True)  # 2 member links extra
    fake_graph.add_members(TENANT, small, [newcomer], silently=True)  # 1 member link missing
    fake_graph.update(TENANT, "users", users[2], jobTitle="Seen By Delta")  # an ordinary change, for contrast

    harness.sync()  # a delta round: sees only the ordinary change
    stale = parse_snapshot(harness.output.snapshot("users"))
    assert stale[users[2]]["jobTitle"] == "Seen By Delta"
    assert "ffffffff-ghost" not in stale and users[0] in stale, "delta forgot them"
    assert set(groups[big]["members"][:2]) <= set(parse_snapshot(harness.output.snapshot("groups"))[big]["members"])
    for job in ("users", "groups"):
        make_due(out_dir, job)
        harness.files[job] = set(harness.output.change_files(job))

    daemon = start_graphsync("run", "--config", str(config))
    expected = {
        "users": {"missing": 1, "extra": 1, "different": 1, "member_missing": 0, "member_extra": 0},
        "groups": {"missing": 0, "extra": 0, "different": 0, "member_missing": 1, "member_extra": 2},
    }
    deadline = time.monotonic() + 90
    while any(drift_metric(port, job, "missing") is None for job in expected) or any(
        "reconciliation" not in (harness.output.state(job) or {}) for job in expected
    ):
        assert daemon.poll() is None, daemon.communicate()
        if time.monotonic() > deadline:
            pytest.fail("the daemon did not reconcile both jobs within 90 s")
        time.sleep(0.2)
    metrics = {job: {kind: drift_metric(port, job, kind) for kind in counts} for job, counts in expected.items()}
    daemon.terminate()
    _, stderr = daemon.communicate(timeout=20)

    assert metrics == expected
    for job, counts in expected.items():
        state = harness.output.state(job)
        assert state is not None
        assert state["reconciliation"]["drift"] == counts
        assert state["last_full_round"] == state["reconciliation"]["at"] == state["last_success_started"]
        harness.check(job, job, touched=None, full=True)  # corrected: the snapshot equals the directory again
    users_state = harness.output.state("users")
    assert users_state is not None
    assert users_state["reconciliation"]["first_ids"] == {
        "missing": ["ffffffff-ghost"],
        "extra": [users[0]],
        "different": [users[1]],
    }
    assert "found drift" in stderr and "ffffffff-ghost" in stderr, stderr

    harness.sync()  # reconciled just now: the next run is an ordinary delta round again
    assert harness.output.state("users")["last_full_round"] == users_state["last_full_round"]  # type: ignore[index]


def test_a_reconciliation_without_drift_uploads_nothing_and_reconcile_every_zero_never_reconciles(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, out_dir: Path
) -> None:
    jobs = [USERS_JOB, {**USERS_JOB, "name": "never", "reconcile_every": "0"}]
    config = write_config(graphsync_config, fake_graph, jobs=jobs, output={"directory": str(out_dir)})
    harness = Harness(fake_graph, run_graphsync, config, DirectoryOutput(out_dir), {"users": "users", "never": "users"})
    populate(fake_graph, TENANT, users=300, groups=0, seed=32)
    harness.sync_and_check(full=True)
    snapshot_inode = (out_dir / TENANT / "users" / "snapshot.jsonl").stat().st_ino
    make_due(out_dir, "users")
    make_due(out_dir, "never")

    harness.sync()  # both are due; only the job that reconciles makes this a full round
    users, never = harness.output.state("users"), harness.output.state("never")
    assert users is not None and never is not None
    assert users["reconciliation"]["drift"] == dict.fromkeys(users["reconciliation"]["drift"], 0)
    assert (out_dir / TENANT / "users" / "snapshot.jsonl").stat().st_ino == snapshot_inode, "nothing published"
    assert any(name.endswith("-full.jsonl") for name in harness.output.change_files("users"))
    assert "reconciliation" not in never and not any(
        name.endswith("-full.jsonl") and name not in harness.files["never"]
        for name in harness.output.change_files("never")
    )


def test_reconciliation_does_not_count_ordinary_changes_since_the_last_run_as_drift(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, out_dir: Path
) -> None:
    config = write_config(graphsync_config, fake_graph, jobs=[USERS_JOB], output={"directory": str(out_dir)})
    harness = Harness(fake_graph, run_graphsync, config, DirectoryOutput(out_dir), {"users": "users"})
    populate(fake_graph, TENANT, users=50, groups=0, seed=5)
    harness.sync_and_check(full=True)
    users = list(fake_graph.objects(TENANT, "users"))
    make_due(out_dir, "users")
    # Ordinary changes that delta reports: nothing was missed, so nothing is drift.
    fake_graph.update(TENANT, "users", users[3], jobTitle="Promoted")
    fake_graph.add(TENANT, "users", {"id": "ffffffff-new", "displayName": "New hire"})

    harness.sync()

    state = harness.output.state("users")
    assert state is not None
    assert state["reconciliation"]["drift"] == dict.fromkeys(state["reconciliation"]["drift"], 0), state
    new = {
        name: data for name, data in harness.output.change_files("users").items() if name not in harness.files["users"]
    }
    assert len(new) == 2, sorted(new)
    delta = next(data for name, data in new.items() if not name.endswith("-full.jsonl"))
    assert {json.loads(line)["id"] for line in delta.splitlines()} == {users[3], "ffffffff-new"}, "delta's own file"
    assert_same(parse_snapshot(harness.output.snapshot("users")), truth(fake_graph, "users"), "snapshot vs directory")


def test_a_restarted_replica_exports_the_last_success_and_reconciliation_recorded_in_state_json(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    run_graphsync: RunGraphsync,
    start_graphsync: StartGraphsync,
    out_dir: Path,
) -> None:
    """Alerts on a job's age and on drift must not depend on which process last succeeded or reconciled."""
    port = free_port()
    config = write_config(
        graphsync_config,
        fake_graph,
        jobs=[{**USERS_JOB, "every": "1h"}],
        output={"directory": str(out_dir)},
        metrics={"port": port},
    )
    populate(fake_graph, TENANT, users=20, groups=0, seed=33)
    assert run_graphsync("sync", "--config", str(config)).returncode == 0  # another process, now gone
    path = out_dir / TENANT / "users" / "state.json"
    state = json.loads(path.read_bytes())
    drift = {"missing": 2, "extra": 0, "different": 1, "member_missing": 0, "member_extra": 0}
    state["reconciliation"] = {"at": "2026-01-02T03:04:05Z", "drift": drift, "first_ids": {}}
    path.write_text(json.dumps(state))
    fake_graph.deny(TENANT, "users")  # this daemon's runs fail (or skip: the slot was served): no success of its own

    daemon = start_graphsync("run", "--config", str(config))
    deadline = time.monotonic() + 60
    while gauge(port, "graphsync_reconcile_last_timestamp_seconds", job="users") is None:
        assert daemon.poll() is None, daemon.communicate()
        if time.monotonic() > deadline:
            pytest.fail("the daemon did not export the recorded reconciliation within 60 s")
        time.sleep(0.2)

    assert gauge(port, "graphsync_job_last_success_timestamp_seconds", job="users") == epoch(state["last_success"])
    assert gauge(port, "graphsync_reconcile_last_timestamp_seconds", job="users") == epoch("2026-01-02T03:04:05Z")
    assert {kind: drift_metric(port, "users", kind) for kind in drift} == drift
