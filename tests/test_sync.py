"""`graphsync sync` against the Graph fake, Azurite and the Entra fake, each run a real process.

The oracle is always the fake's own truth (``FakeGraph.objects``) projected onto the job's ``$select``: after every
run the snapshot must equal it exactly, and the run's change file must be exactly what turns the previous snapshot
into the new one, naming only objects the test actually touched.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContainerClient

from graphsync.pool import STOP_GRACE_SECONDS
from tests.fakes.graph import FakeGraph, GraphRequest, mutate, populate

if TYPE_CHECKING:
    from tests.conftest import Azurite, RunGraphsync, StartGraphsync, WriteConfig
    from tests.fakes.entra import FakeEntra

TENANT = "contoso.onmicrosoft.com"
USER_SELECT = ["displayName", "mail", "jobTitle"]
GROUP_SELECT = ["displayName", "members"]
USERS_JOB = {"name": "users", "resource": "users", "delta": True, "select": USER_SELECT, "every": "5m"}
GROUPS_JOB = {"name": "groups", "resource": "groups", "delta": True, "select": GROUP_SELECT, "every": "5m"}
SELECT = {"users": USER_SELECT, "groups": GROUP_SELECT}
GUID = re.compile(r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}")
CHANGE_FILE = re.compile(r"(?P<stamp>\d{8}T\d{6}Z)-(?P<run>[0-9a-f]{12})(?P<full>-full)?\.jsonl")
TRUNCATED = b'{"value": [{"id": "x"'


# -- reading the output ------------------------------------------------------------------------------------


class Output(Protocol):
    def snapshot(self, job: str) -> bytes | None: ...
    def state(self, job: str) -> dict[str, Any] | None: ...
    def change_files(self, job: str) -> dict[str, bytes]: ...


class DirectoryOutput:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _file(self, job: str, *parts: str) -> Path:
        return self.root / TENANT / job / Path(*parts)

    def snapshot(self, job: str) -> bytes | None:
        path = self._file(job, "snapshot.jsonl")
        return path.read_bytes() if path.exists() else None

    def state(self, job: str) -> dict[str, Any] | None:
        path = self._file(job, "state.json")
        return json.loads(path.read_bytes()) if path.exists() else None

    def change_files(self, job: str) -> dict[str, bytes]:
        assert not list(self.root.rglob("*.tmp")), "a temp file was left behind"
        directory = self._file(job, "changes")
        return {path.name: path.read_bytes() for path in directory.iterdir()} if directory.is_dir() else {}


class BlobOutput:
    """The same layout read back with azure-storage-blob, as a consumer of the container would."""

    def __init__(self, container: ContainerClient) -> None:
        self.container = container

    def _read(self, name: str) -> bytes | None:
        try:
            return self.container.download_blob(name).readall()
        except ResourceNotFoundError:
            return None

    def snapshot(self, job: str) -> bytes | None:
        return self._read(f"{TENANT}/{job}/snapshot.jsonl")

    def state(self, job: str) -> dict[str, Any] | None:
        data = self._read(f"{TENANT}/{job}/state.json")
        return None if data is None else json.loads(data)

    def change_files(self, job: str) -> dict[str, bytes]:
        prefix = f"{TENANT}/{job}/changes/"
        return {
            blob.name.removeprefix(prefix): self.container.download_blob(blob.name).readall()
            for blob in self.container.list_blobs(name_starts_with=prefix)
        }


# -- the oracle --------------------------------------------------------------------------------------------


def truth(fake: FakeGraph, resource: str) -> dict[str, dict[str, Any]]:
    """The fake's directory projected onto the job's $select (unset properties as null; members as sorted ids)."""
    return {
        oid: {"id": oid, **{name: obj.get(name) for name in SELECT[resource]}}
        for oid, obj in fake.objects(TENANT, resource).items()
    }


def parse_snapshot(data: bytes | None) -> dict[str, dict[str, Any]]:
    assert data is not None, "no snapshot.jsonl"
    assert data == b"" or data.endswith(b"\n")
    objects = [json.loads(line) for line in data.splitlines()]
    ids = [obj["id"] for obj in objects]
    assert ids == sorted(set(ids)), "the snapshot must hold one line per id, sorted by id"
    return {obj["id"]: obj for obj in objects}


def assert_same(actual: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Equality with a readable report for thousands of objects."""
    if actual == expected:
        return
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    wrong = [(actual[k], expected[k]) for k in sorted(actual.keys() & expected.keys()) if actual[k] != expected[k]]
    pytest.fail(
        f"{what}: {len(missing)} missing {missing[:3]}, {len(extra)} extra {extra[:3]}, "
        f"{len(wrong)} differ, e.g. (got, want) {wrong[:2]}"
    )


def replay(previous: Mapping[str, dict[str, Any]], lines: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Graph's delta semantics, written independently of daemon.snapshot: apply change lines to a snapshot."""
    current = {oid: dict(obj) for oid, obj in previous.items()}
    for line in lines:
        if "@removed" in line:
            current.pop(line["id"], None)
            continue
        obj = current.setdefault(line["id"], {})
        for key, value in line.items():
            if key == "members@delta":
                members = set(obj.get("members") or ())
                for entry in value:
                    (members.discard if "@removed" in entry else members.add)(entry["id"])
                obj["members"] = sorted(members)
            else:
                obj[key] = value
    return current


def touched_ids(done: Iterable[str]) -> set[str]:
    """Every object id `mutate` names in what it did."""
    return {oid for line in done for oid in GUID.findall(line)}


def output_text(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@dataclass
class Harness:
    """Runs `graphsync sync` and checks every job's snapshot, change file and state after each run."""

    fake: FakeGraph
    run_graphsync: RunGraphsync
    config: Path
    output: Output
    jobs: dict[str, str]  # job name -> resource
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    truths: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, set[str]] = field(default_factory=dict)

    def sync(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = self.run_graphsync("sync", "--config", str(self.config), *args)
        assert result.returncode == expect, output_text(result)
        assert "Traceback" not in result.stderr, output_text(result)
        return result

    def sync_and_check(self, *, touched: set[str] | None = None, full: bool = False) -> dict[str, list[dict]]:
        """One successful run; returns each job's change lines (empty when the run had none)."""
        self.sync()
        return {job: self.check(job, resource, touched=touched, full=full) for job, resource in self.jobs.items()}

    def check(self, job: str, resource: str, *, touched: set[str] | None, full: bool) -> list[dict[str, Any]]:
        expected = truth(self.fake, resource)
        snapshot = parse_snapshot(self.output.snapshot(job))
        assert_same(snapshot, expected, f"{job} snapshot vs the directory")
        state = self.output.state(job)
        assert state is not None and state["objects"] == len(expected) and state["last_error"] is None

        files = self.output.change_files(job)
        new = sorted(files.keys() - self.files.get(job, set()))
        self.files[job] = set(files)
        previous_truth = self.truths.get(job, {})
        differing = {
            oid for oid in expected.keys() | previous_truth.keys() if expected.get(oid) != previous_truth.get(oid)
        }
        lines: list[dict[str, Any]] = []
        if not new:
            assert state["changes"] == 0, f"{job}: the run counted changes but wrote no change file"
            assert not differing, f"{job}: {len(differing)} objects changed but the run wrote no change file"
        else:
            assert len(new) == 1, f"{job}: one run must write one change file, got {new}"
            match = CHANGE_FILE.fullmatch(new[0])
            assert match, f"{job}: change file name {new[0]!r}"
            assert match["run"] == state["last_run_id"]
            assert bool(match["full"]) == full, f"{job}: {new[0]} (full sync expected: {full})"
            lines = [json.loads(line) for line in files[new[0]].splitlines()]
            assert len(lines) == state["changes"]
            soft_deleted = self.fake.soft_deleted(TENANT, resource)
            for line in lines:
                if "@removed" in line:
                    assert line == {
                        "id": line["id"],
                        "@removed": {"reason": "changed" if line["id"] in soft_deleted else "deleted"},
                    }
                    assert line["id"] not in expected
            assert_same(
                replay({} if full else self.snapshots.get(job, {}), lines),
                snapshot,
                f"{job}: previous snapshot + change file vs new snapshot",
            )
            ids = {line["id"] for line in lines}
            if full:  # a full listing replaces the snapshot: every object, no tombstones
                assert ids == expected.keys(), f"{job}: a full change file must list every object once or more"
            else:
                assert differing <= ids, f"{job}: changed objects missing from the change file: {differing - ids}"
            if touched is not None:
                assert ids <= touched, f"{job}: change file names objects nobody touched: {ids - touched}"
        self.snapshots[job] = snapshot
        self.truths[job] = expected
        return lines


class Tap:
    """Wraps the fake's request handler to see each reply (with its request-id) and act after the Nth request.

    The fake's fault knobs apply to "the next request"; this places them on a chosen page of a run
    deterministically, because the daemon fetches pages one after the other.
    """

    def __init__(self, fake: FakeGraph, monkeypatch: pytest.MonkeyPatch) -> None:
        self.replies: list[tuple[str, int, str]] = []  # (target, status, request-id)
        self._lock = threading.Lock()
        self._actions: list[list[Any]] = []  # [requests still to see, action]
        original = fake._handle

        def handle(method: str, target: str, headers: Mapping[str, str], *body: bytes) -> Any:
            reply = original(method, target, headers, *body)
            with self._lock:
                self.replies.append((target, reply.status, reply.headers["request-id"]))
                for pending in self._actions:
                    pending[0] -= 1
                    if pending[0] == 0:
                        pending[1]()
            return reply

        monkeypatch.setattr(fake, "_handle", handle)

    def after(self, requests: int, action: Callable[[], None]) -> None:
        """Call ``action`` once the fake has answered ``requests`` more requests (before the next one comes)."""
        with self._lock:
            self._actions.append([requests, action])


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


def write_config(
    graphsync_config: WriteConfig,
    fake: FakeGraph,
    *,
    jobs: Iterable[dict[str, Any]],
    output: dict[str, Any],
    **extra: Any,
) -> Path:
    return graphsync_config(extra={"graph": {"endpoint": fake.base_url}, "output": output, "jobs": list(jobs), **extra})


class MakeHarness(Protocol):
    def __call__(self, *jobs: dict[str, Any]) -> Harness: ...


@pytest.fixture
def make_harness(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, out_dir: Path
) -> MakeHarness:
    """A harness for ``jobs`` writing to a directory."""

    def make(*jobs: dict[str, Any]) -> Harness:
        config = write_config(graphsync_config, fake_graph, jobs=jobs, output={"directory": str(out_dir)})
        return Harness(
            fake_graph, run_graphsync, config, DirectoryOutput(out_dir), {job["name"]: job["resource"] for job in jobs}
        )

    return make


@pytest.fixture
def harness(make_harness: MakeHarness) -> Harness:
    """The users and groups jobs."""
    return make_harness(USERS_JOB, GROUPS_JOB)


@pytest.fixture
def sync_users(make_harness: MakeHarness) -> Harness:
    """The users job only: cheaper for tests about one collection."""
    return make_harness(USERS_JOB)


def graph_requests(fake: FakeGraph, since: int = 0) -> list[GraphRequest]:
    """Requests to the Graph API (from the ``since``-th recorded request on)."""
    return [r for r in fake.requests[since:] if r.path.startswith("/v1.0/")]


# -- 1. full sync, then delta rounds -----------------------------------------------------------------------


@pytest.mark.parametrize("knob", ["plain", "duplicate_records", "empty_pages", "members_chunk"])
def test_delta_rounds_keep_the_snapshot_equal_to_the_directory(
    harness: Harness, fake_graph: FakeGraph, knob: str
) -> None:
    populate(fake_graph, TENANT, users=3000, groups=120, seed=7)
    if knob == "members_chunk":
        fake_graph.members_chunk = 4
    elif knob != "plain":
        setattr(fake_graph, knob, True)

    harness.sync_and_check(full=True)
    user_pages = [r for r in fake_graph.requests if r.path == "/v1.0/users/delta"]
    assert len(user_pages) >= 30 * (2 if knob == "empty_pages" else 1), "3000 users at 100 a page"
    if knob == "members_chunk":
        # Groups of up to 50 members in chunks of 4: the same group comes in several records.
        group_file = next(iter(harness.output.change_files("groups").values())).splitlines()
        assert len(group_file) > 120

    rng = random.Random(f"rounds-{knob}")
    for _ in range(3):
        done = mutate(fake_graph, TENANT, rng, changes=40)
        lines = harness.sync_and_check(touched=touched_ids(done))
        assert lines["users"], "every round of 40 changes touches users"
        if knob == "duplicate_records":
            ids = [line["id"] for line in lines["users"]]
            assert len(ids) > len(set(ids)), "the fake repeats records; the change file keeps what Graph sent"


def test_partial_updates_keep_absent_properties_and_clear_nulled_ones(
    sync_users: Harness, fake_graph: FakeGraph
) -> None:
    populate(fake_graph, TENANT, users=250, groups=0, seed=3)
    sync_users.sync_and_check(full=True)
    renamed, cleared, both = [
        uid for uid, user in fake_graph.objects(TENANT, "users").items() if user["jobTitle"] is not None
    ][:3]
    fake_graph.update(TENANT, "users", renamed, displayName="Renamed Person")
    fake_graph.update(TENANT, "users", cleared, jobTitle=None)
    fake_graph.update(TENANT, "users", both, jobTitle="Chief Tester", mail=None)

    lines = {line["id"]: line for line in sync_users.sync_and_check(touched={renamed, cleared, both})["users"]}

    # Prefer: return=minimal was honoured: each record carries only what changed ...
    assert lines == {
        renamed: {"id": renamed, "displayName": "Renamed Person"},
        cleared: {"id": cleared, "jobTitle": None},
        both: {"id": both, "jobTitle": "Chief Tester", "mail": None},
    }
    # ... and the snapshot kept the rest, with cleared properties present as null.
    snapshot = sync_users.snapshots["users"]
    before = sync_users.truths["users"]
    assert snapshot[renamed]["mail"] == before[renamed]["mail"] is not None
    assert snapshot[cleared] == {**before[cleared], "jobTitle": None}
    assert "jobTitle" in snapshot[cleared]
    assert snapshot[both]["mail"] is None and snapshot[both]["displayName"] is not None
    raw = sync_users.output.snapshot("users")
    assert raw is not None and f'"id":"{cleared}","jobTitle":null'.encode() in raw


def test_soft_deleted_users_come_back_on_restore_and_hard_deletes_stay_gone(
    sync_users: Harness, fake_graph: FakeGraph
) -> None:
    populate(fake_graph, TENANT, users=300, groups=0, seed=4)
    sync_users.sync_and_check(full=True)
    soft, hard, purged = list(fake_graph.objects(TENANT, "users"))[10:13]
    fake_graph.delete(TENANT, "users", soft)
    fake_graph.delete(TENANT, "users", hard, soft=False)
    fake_graph.delete(TENANT, "users", purged)

    lines = sync_users.sync_and_check(touched={soft, hard, purged})["users"]
    assert sorted(lines, key=lambda line: line["id"]) == sorted(
        [
            {"id": soft, "@removed": {"reason": "changed"}},
            {"id": hard, "@removed": {"reason": "deleted"}},
            {"id": purged, "@removed": {"reason": "changed"}},
        ],
        key=lambda line: line["id"],
    )
    assert not {soft, hard, purged} & sync_users.snapshots["users"].keys()

    fake_graph.restore(TENANT, "users", soft)
    fake_graph.delete(TENANT, "users", purged, soft=False)
    lines = sync_users.sync_and_check(touched={soft, purged})["users"]
    restored = {line["id"]: line for line in lines}
    assert restored[soft] == sync_users.truths["users"][soft], "a restored user comes back whole"
    assert restored[purged] == {"id": purged, "@removed": {"reason": "deleted"}}
    assert soft in sync_users.snapshots["users"] and purged not in sync_users.snapshots["users"]


def test_group_members_split_across_records_and_pages_add_and_remove(
    make_harness: MakeHarness, fake_graph: FakeGraph
) -> None:
    harness = make_harness(GROUPS_JOB)
    populate(fake_graph, TENANT, users=400, groups=30, seed=5)
    fake_graph.members_chunk = 3
    fake_graph.page_size = 7
    harness.sync_and_check(full=True)

    groups = fake_graph.objects(TENANT, "groups")
    users = list(fake_graph.objects(TENANT, "users"))
    big = max(groups, key=lambda gid: len(groups[gid]["members"]))
    shrinking = sorted(groups, key=lambda gid: len(groups[gid]["members"]))[-2]
    joining = [uid for uid in users if uid not in groups[big]["members"]][:11]
    fake_graph.add_members(TENANT, big, joining)
    fake_graph.remove_members(TENANT, big, groups[big]["members"][:2])
    fake_graph.remove_members(TENANT, shrinking, groups[shrinking]["members"][:5])
    fake_graph.update(TENANT, "groups", shrinking, displayName="Shrinking Group")

    lines = harness.sync_and_check(touched={big, shrinking})["groups"]
    assert sum(line["id"] == big for line in lines) == 5, "13 member changes in chunks of 3"
    snapshot = harness.snapshots["groups"]
    assert set(joining) <= set(snapshot[big]["members"])
    assert not set(groups[big]["members"][:2]) & set(snapshot[big]["members"])
    assert snapshot[shrinking]["members"] == groups[shrinking]["members"][5:]
    assert snapshot[shrinking]["displayName"] == "Shrinking Group"

    rng = random.Random(55)
    for _ in range(2):
        harness.sync_and_check(touched=touched_ids(mutate(fake_graph, TENANT, rng, changes=30)))


def test_blob_container_output_equals_the_directory(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, azurite: Azurite
) -> None:
    container = f"exports-{uuid.uuid4().hex[:8]}"  # not created beforehand: a fresh deployment's first run
    config = write_config(graphsync_config, fake_graph, jobs=[USERS_JOB, GROUPS_JOB], output={"container": container})
    populate(fake_graph, TENANT, users=1500, groups=60, seed=6)
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        harness = Harness(
            fake_graph,
            run_graphsync,
            config,
            BlobOutput(service.get_container_client(container)),
            {"users": "users", "groups": "groups"},
        )
        harness.sync_and_check(full=True)
        rng = random.Random(66)
        for _ in range(2):
            harness.sync_and_check(touched=touched_ids(mutate(fake_graph, TENANT, rng, changes=30)))


# -- 2. a truncated page ---------------------------------------------------------------------------------------


def test_a_truncated_page_fails_the_run_and_changes_nothing(
    sync_users: Harness, fake_graph: FakeGraph, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(fake_graph, TENANT, users=500, groups=0, seed=8)
    sync_users.sync_and_check(full=True)
    snapshot_before = (out_dir / TENANT / "users" / "snapshot.jsonl").read_bytes()
    state_before = sync_users.output.state("users")
    assert state_before is not None
    files_before = sync_users.output.change_files("users")

    done = mutate(fake_graph, TENANT, random.Random(9), changes=60)
    fake_graph.page_size = 10
    tap = Tap(fake_graph, monkeypatch)
    tap.after(3, lambda: fake_graph.fail_next(1, body=TRUNCATED))  # the 4th page of the delta round
    result = sync_users.sync(expect=1)

    target, status, request_id = tap.replies[3]
    assert status == 200 and target.startswith("/v1.0/users/delta?$skiptoken="), tap.replies
    text = result.stdout + result.stderr
    assert "/v1.0/users/delta" in text and f"request-id {request_id}" in text, output_text(result)
    assert (out_dir / TENANT / "users" / "snapshot.jsonl").read_bytes() == snapshot_before
    state = sync_users.output.state("users")
    assert state is not None and state["delta_link"] == state_before["delta_link"]
    assert request_id in state["last_error"]
    assert sync_users.output.change_files("users") == files_before

    sync_users.sync_and_check(touched=touched_ids(done))


def test_sigterm_while_graph_holds_the_page_fetched_ahead_stops_the_round_and_advances_nothing(
    sync_users: Harness,
    fake_graph: FakeGraph,
    out_dir: Path,
    own_work_directory: Path,
    start_graphsync: StartGraphsync,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Graph holds page 3 of a delta round, which the run asked for while it applied page 2, and SIGTERM comes:
    the run stops at once (not when the page comes), publishes nothing, saves no cursor, leaves no change file, no
    temp file and its working store as it was; the next run is an ordinary, exact delta round."""
    populate(fake_graph, TENANT, users=500, groups=0, seed=31)
    sync_users.sync_and_check(full=True)
    job_dir = out_dir / TENANT / "users"
    before = {name: (job_dir / name).read_bytes() for name in ("snapshot.jsonl", "state.json")}
    files_before = sync_users.output.change_files("users")
    store = own_work_directory / TENANT / "users" / "store.sqlite"
    store_before = store.read_bytes()

    done = mutate(fake_graph, TENANT, random.Random(32), changes=60)
    fake_graph.page_size = 3  # a delta round of many pages
    held = threading.Event()
    arrivals: list[str] = []
    handle = fake_graph._handle

    def holding_page_3(method: str, target: str, headers: Mapping[str, str], *body: bytes) -> Any:
        arrivals.append(target)
        if len(arrivals) == 3:
            fake_graph.hang(TENANT, 60)  # this request, and any after it, wait unanswered
            held.set()
        return handle(method, target, headers, *body)

    monkeypatch.setattr(fake_graph, "_handle", holding_page_3)
    process = start_graphsync("sync", "--config", str(sync_users.config))
    assert held.wait(60), "the run never asked for page 3"
    time.sleep(0.5)  # page 2 is applied meanwhile; the run now waits for page 3
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    stdout, stderr = process.communicate(timeout=30)
    took = time.monotonic() - signalled

    assert process.returncode == 1, stdout + stderr
    assert took < STOP_GRACE_SECONDS, f"exited {took:.1f} s after SIGTERM: it waited for the held page"
    assert "stopped: stopped while the next page was being fetched" in stdout, stdout
    assert "Traceback" not in stderr, stderr
    assert len(arrivals) == 3, "nothing was asked for after the held page"
    assert {name: (job_dir / name).read_bytes() for name in before} == before
    assert sync_users.output.change_files("users") == files_before  # also: no temp file in the output
    assert store.read_bytes() == store_before, "the working store moved"
    assert not [p for p in store.parent.iterdir() if p.name not in ("store.sqlite", "store.lock")]

    fake_graph.hang(TENANT, 0)
    sync_users.sync_and_check(touched=touched_ids(done))


# -- 3. throttling ---------------------------------------------------------------------------------------------


def test_a_429_is_retried_no_sooner_than_retry_after(
    sync_users: Harness, fake_graph: FakeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(fake_graph, TENANT, users=500, groups=0, seed=10)
    tap = Tap(fake_graph, monkeypatch)
    tap.after(2, lambda: fake_graph.throttle_next(1, retry_after="2"))

    sync_users.sync_and_check(full=True)

    requests = graph_requests(fake_graph)
    throttled = [index for index, request in enumerate(requests) if request.status == 429]
    assert throttled == [2], [r.status for r in requests]
    retry = requests[3]
    assert retry.path == requests[2].path and retry.query == requests[2].query, "the same page again"
    assert retry.time - requests[2].time >= 2.0
    assert retry.status == 200


# -- 4. expired delta links ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "mid_round"),
    [
        pytest.param(410, "syncStateNotFound", False, id="410"),
        pytest.param(400, "syncStateNotFound", False, id="400 syncStateNotFound"),
        pytest.param(410, "syncStateNotFound", True, id="410 on a later page"),
    ],
)
def test_an_expired_delta_link_means_a_full_resync(
    sync_users: Harness,
    fake_graph: FakeGraph,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    code: str,
    mid_round: bool,
) -> None:
    populate(fake_graph, TENANT, users=400, groups=0, seed=11)
    sync_users.sync_and_check(full=True)
    rng = random.Random(12)
    sync_users.sync_and_check(touched=touched_ids(mutate(fake_graph, TENANT, rng, changes=20)))
    state = sync_users.output.state("users")
    assert state is not None
    link_before = state["delta_link"]

    if not mid_round:
        fake_graph.expire_delta_tokens(status=status, code=code)
    users = list(fake_graph.objects(TENANT, "users"))
    fake_graph.silently_change(TENANT, "users", users[0], displayName="Changed Without A Record")
    fake_graph.silently_change(TENANT, "users", users[1], jobTitle=None)
    fake_graph.delete(TENANT, "users", users[2], soft=False)
    fake_graph.delete(TENANT, "users", users[3])
    mutate(fake_graph, TENANT, rng, changes=30)
    if mid_round:  # the link still works, but the round's third page comes after the sync state is gone
        fake_graph.page_size = 10
        Tap(fake_graph, monkeypatch).after(2, lambda: fake_graph.expire_delta_tokens(status=status, code=code))
    mark = len(fake_graph.requests)

    sync_users.sync_and_check(full=True)

    expired = [r for r in graph_requests(fake_graph, mark) if r.status == status]
    assert len(expired) == 1
    assert ("$skiptoken" if mid_round else "$deltatoken") in expired[0].query
    snapshot = sync_users.snapshots["users"]
    assert snapshot[users[0]]["displayName"] == "Changed Without A Record"
    assert snapshot[users[1]]["jobTitle"] is None
    assert users[2] not in snapshot and users[3] not in snapshot
    state = sync_users.output.state("users")
    assert state is not None and state["delta_link"] != link_before
    # The new link works: the next round is an ordinary delta round again.
    sync_users.sync_and_check(touched=touched_ids(mutate(fake_graph, TENANT, rng, changes=10)))


# -- 5. a rejected access token ------------------------------------------------------------------------------


def test_a_rejected_access_token_is_replaced_once(
    sync_users: Harness, fake_graph: FakeGraph, fake_entra: FakeEntra
) -> None:
    populate(fake_graph, TENANT, users=300, groups=0, seed=13)
    sync_users.sync_and_check(full=True)
    issued = fake_entra.token_requests(TENANT)
    assert len(issued) == 1 and issued[0].access_token is not None
    old_token = issued[0].access_token
    fake_entra.revoke(old_token)
    mark = len(fake_graph.requests)

    sync_users.sync_and_check(touched=touched_ids(mutate(fake_graph, TENANT, random.Random(14), changes=20)))

    assert len(fake_entra.token_requests(TENANT)) == 2, "exactly one fresh token"
    new_token = fake_entra.token_requests(TENANT)[-1].access_token
    requests = graph_requests(fake_graph, mark)
    assert requests[0].status == 401 and requests[0].headers["authorization"] == f"Bearer {old_token}"
    assert all(r.status == 200 and r.headers["authorization"] == f"Bearer {new_token}" for r in requests[1:])


# -- 6. the job lock -------------------------------------------------------------------------------------------


def test_a_job_locked_by_another_replica_exits_3_or_waits_with_wait(
    sync_users: Harness,
    fake_graph: FakeGraph,
    azurite: Azurite,
    blob_container: str,
    out_dir: Path,
    start_graphsync: StartGraphsync,
) -> None:
    populate(fake_graph, TENANT, users=200, groups=0, seed=15)
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        lock = service.get_container_client(blob_container).get_blob_client(f"locks/{TENANT}/users.lock")
        lock.upload_blob(b"", overwrite=True)
        lease = lock.acquire_lease(lease_duration=-1)
        released = threading.Event()
        try:
            result = sync_users.sync("--job", "users", expect=3)
            assert "running on another replica" in result.stdout, output_text(result)
            assert not (out_dir / TENANT / "users").exists() and not graph_requests(fake_graph)

            process = start_graphsync("sync", "--job", "users", "--wait", "--config", str(sync_users.config))
            release_time: list[float] = []

            def release() -> None:
                release_time.append(time.time())
                lease.release()
                released.set()

            timer = threading.Timer(3.0, release)
            timer.start()
            try:
                stdout, stderr = process.communicate(timeout=30)
            finally:
                timer.cancel()
        finally:
            if not released.is_set():
                lease.release()
    assert process.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert release_time and min(r.time for r in graph_requests(fake_graph)) >= release_time[0], (
        "the waiting run must not touch Graph while the lock is held"
    )
    sync_users.check("users", "users", touched=None, full=True)


# -- 7. request headers and state.json ---------------------------------------------------------------------


def test_requests_carry_ids_and_priority_and_delta_rounds_prefer_minimal(
    sync_users: Harness, fake_graph: FakeGraph
) -> None:
    populate(fake_graph, TENANT, users=350, groups=0, seed=16)
    started = time.time()
    sync_users.sync_and_check(full=True)
    full_round = graph_requests(fake_graph)
    state = sync_users.output.state("users")
    assert state is not None
    link = state["delta_link"]
    assert link.startswith(f"{fake_graph.base_url}/v1.0/users/delta?$deltatoken=")
    assert started - 1 <= datetime.fromisoformat(state["last_success"]).timestamp() <= time.time() + 1
    assert state["objects"] == 350 and re.fullmatch(r"[0-9a-f]{12}", state["last_run_id"])

    fake_graph.page_size = 10
    sync_users.sync_and_check(touched=touched_ids(mutate(fake_graph, TENANT, random.Random(17), changes=40)))
    delta_round = graph_requests(fake_graph, len(full_round))
    assert len(delta_round) >= 3, "a delta round of several pages"
    assert delta_round[0].query["$deltatoken"] == link.rsplit("=", 1)[1], "the saved link is where the round starts"

    ids = [r.headers.get("client-request-id", "") for r in full_round + delta_round]
    assert all(str(uuid.UUID(value)) == value for value in ids), ids
    assert len(set(ids)) == len(ids), "a new client-request-id per request"
    assert {r.headers.get("x-ms-throttle-priority") for r in full_round + delta_round} == {"low"}
    assert all(r.headers.get("prefer") == "return=minimal" for r in delta_round)
    state = sync_users.output.state("users")
    assert state is not None and state["delta_link"] != link
    assert {"delta_link", "last_success", "objects", "last_run_id"} <= state.keys()


# -- 8. bad job definitions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jobs", "key"),
    [
        pytest.param([USERS_JOB, {**GROUPS_JOB, "name": "users"}], "jobs[1].name", id="duplicate name"),
        pytest.param([{**USERS_JOB, "every": "5 minutes"}], "jobs[0].every", id="bad interval"),
        pytest.param([{**USERS_JOB, "every": None, "cron": "61 * * * *"}], "jobs[0].cron", id="bad cron"),
        pytest.param([{**USERS_JOB, "resource": "/users?$top=5"}], "jobs[0].resource", id="bad resource"),
        pytest.param([{**GROUPS_JOB, "expand": ["manager"]}], "jobs[0].expand", id="expand Graph cannot track"),
        pytest.param([{**USERS_JOB, "delta": False, "expand": ["manager"]}], "jobs[0].expand", id="expand no delta"),
        pytest.param([{**USERS_JOB, "reconcile_every": "weekly"}], "jobs[0].reconcile_every", id="bad reconcile"),
        pytest.param(
            [{**USERS_JOB, "resource": "auditLogs/signIns", "select": None, "cursor": "createdDateTime"}],
            "jobs[0].cursor",
            id="delta with cursor",
        ),
        pytest.param(
            [{**USERS_JOB, "resource": "auditLogs/directoryAudits", "select": None}], "jobs[0].delta", id="log delta"
        ),
        pytest.param(
            [{**USERS_JOB, "delta": False, "resource": "auditLogs/signIns", "cursor": "activityDateTime"}],
            "jobs[0].cursor",
            id="wrong cursor",
        ),
    ],
)
def test_bad_job_definitions_exit_2_naming_the_key(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    run_graphsync: RunGraphsync,
    out_dir: Path,
    jobs: list[dict[str, Any]],
    key: str,
) -> None:
    jobs = [{k: v for k, v in job.items() if v is not None} for job in jobs]
    config = write_config(graphsync_config, fake_graph, jobs=jobs, output={"directory": str(out_dir)})
    result = run_graphsync("sync", "--config", str(config))
    assert result.returncode == 2, output_text(result)
    assert "configuration error" in result.stderr and key in result.stderr, output_text(result)
    assert "Traceback" not in result.stderr
    assert not out_dir.exists() and not fake_graph.requests


# -- 9. access denied ------------------------------------------------------------------------------------------


def test_a_403_fails_the_run_with_the_graph_error_code_and_writes_nothing(
    sync_users: Harness, fake_graph: FakeGraph, out_dir: Path
) -> None:
    populate(fake_graph, TENANT, users=50, groups=0, seed=18)
    fake_graph.deny(TENANT, "users")

    result = sync_users.sync("--job", "users", expect=1)

    assert "Authorization_RequestDenied" in result.stdout + result.stderr, output_text(result)
    assert [r.status for r in graph_requests(fake_graph)] == [403]
    assert sync_users.output.snapshot("users") is None and sync_users.output.change_files("users") == {}
    state = sync_users.output.state("users")  # only the failure is recorded, for `graphsync status`
    assert state is None or (state.get("delta_link") is None and "Authorization_RequestDenied" in state["last_error"])
