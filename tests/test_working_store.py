"""A delta round costs what changed: the working store outlives the run, and snapshots are content-defined chunks.

Real processes (`graphsync sync`) against Azurite behind :class:`StorageRelay`, which counts every storage request
and byte. Two replicas are two work directories (two hosts). The oracle for the published bytes is a from-scratch
serialization of the fake directory: compact JSON with sorted keys, one line per object sorted by id.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobBlock, BlobClient, BlobLeaseClient, BlobServiceClient

from graphsync.chunkindex import UnusableIndex, decode_index
from graphsync.chunking import chunk_lines
from tests.conftest import REPO_ROOT
from tests.fakes.graph import FakeGraph, mutate, populate
from tests.fakes.storage_relay import Relayed, StorageRelay
from tests.test_sync import GROUPS_JOB, TENANT, USERS_JOB, assert_same, output_text, parse_snapshot, truth

if TYPE_CHECKING:
    from tests.conftest import Azurite, RunGraphsync, WriteConfig


def fresh_serialization(fake: FakeGraph, resource: str) -> list[tuple[str, bytes]]:
    """The snapshot as written from nothing: what every published version must equal, byte for byte."""
    objects = truth(fake, resource)
    return [
        (oid, json.dumps(objects[oid], separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode() + b"\n")
        for oid in sorted(objects)
    ]


def cold_reads(old: bytes, blocks_after: list[tuple[str, int]], touched: set[str]) -> tuple[int, int]:
    """What a host without a store must read of the ``old`` snapshot for a round that touched ``touched`` and
    published ``blocks_after``: ``(bytes of the chunks where the touched ids are or would be, bytes in all)``.

    An id between two chunks belongs to the later one; beyond those, the host reads every chunk the round cut
    again, which is no longer published."""
    chunks = [chunk.ref for chunk in chunk_lines((json.loads(line)["id"], line) for line in old.splitlines(True))]
    if not chunks:
        return 0, 0
    last_ids = [chunk.last_id for chunk in chunks]
    covering = {chunks[min(bisect.bisect_left(last_ids, oid), len(chunks) - 1)].block_id for oid in touched}
    published = {block for block, _ in blocks_after}
    return (
        sum(chunk.size for chunk in chunks if chunk.block_id in covering),
        sum(chunk.size for chunk in chunks if chunk.block_id in covering or chunk.block_id not in published),
    )


class Replica:
    """One host: a work directory of its own, the shared config."""

    def __init__(self, name: str, root: Path, run_graphsync: RunGraphsync, config: Path) -> None:
        self.name = name
        self.env = {"XDG_CACHE_HOME": str(root / name)}
        self.work = root / name / "graphsync" / "work"
        self._run = run_graphsync
        self.config = config

    def sync(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = self._run("sync", "--config", str(self.config), *args, env=self.env, timeout=120)
        assert result.returncode == expect, output_text(result)
        assert "Traceback" not in result.stderr, output_text(result)
        return result

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "graphsync", "sync", "--config", str(self.config)],
            cwd=REPO_ROOT,
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def store(self, job: str) -> Path:
        return self.work / TENANT / job / "store.sqlite"


@pytest.fixture
def relay(azurite: Azurite) -> Iterator[StorageRelay]:
    with StorageRelay(azurite) as relay:
        yield relay


class Exports:
    """The output container as a consumer reads it."""

    def __init__(self, azurite: Azurite, container: str) -> None:
        self.name = container
        self._container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
            container
        )

    def snapshot_blob(self, job: str) -> str:
        """The blob's path as the relay records it."""
        return f"{self.name}/{TENANT}/{job}/snapshot.jsonl"

    def published(self, job: str) -> tuple[bytes, str, list[tuple[str, int]]]:
        """The committed snapshot of ``job``: bytes, ETag and block list."""
        blob = self._container.get_blob_client(f"{TENANT}/{job}/snapshot.jsonl")
        download = blob.download_blob()
        data = download.readall()
        committed, _ = blob.get_block_list("committed")
        return data, download.properties.etag, [(b.id, b.size) for b in committed]

    def state(self, job: str) -> dict[str, Any]:
        return json.loads(self._container.download_blob(f"{TENANT}/{job}/state.json").readall())

    def index_blob(self, job: str) -> str:
        """The published index's path as the relay records it."""
        return f"{self.name}/{TENANT}/{job}/snapshot.index.json.gz"

    def index(self, job: str) -> BlobClient:
        return self._container.get_blob_client(f"{TENANT}/{job}/snapshot.index.json.gz")

    def index_matches_the_snapshot(self, job: str) -> bool:
        try:
            decode_index(self.index(job).download_blob().readall(), self.published(job)[2])
        except (UnusableIndex, ResourceNotFoundError):
            return False
        return True

    def change_files(self, job: str) -> set[str]:
        return set(self._container.list_blob_names(name_starts_with=f"{TENANT}/{job}/changes/"))

    def ids_in(self, names: set[str]) -> set[str]:
        """The ids of every record in the change files ``names``: what their rounds touched."""
        return {
            json.loads(line)["id"]
            for name in names
            for line in self._container.download_blob(name).readall().splitlines()
        }

    def snapshot_requests(
        self, records: list[Relayed], job: str, method: str, comp: str | None = None
    ) -> list[Relayed]:
        return [r for r in records if r.blob == self.snapshot_blob(job) and r.method == method and r.comp == comp]

    def assert_equals_fresh_serialization(self, fake: FakeGraph, job: str, resource: str) -> None:
        data, _, blocks = self.published(job)
        fresh = fresh_serialization(fake, resource)
        assert_same(parse_snapshot(data), truth(fake, resource), f"{job} snapshot vs the directory")
        assert data == b"".join(line for _, line in fresh), f"{job}: not byte-identical to a fresh serialization"
        assert [b for b, _ in blocks] == [c.ref.block_id for c in chunk_lines(fresh)], f"{job}: chunks differ"


@pytest.fixture
def exports(azurite: Azurite, blob_container: str) -> Exports:
    return Exports(azurite, blob_container)


class Hosts(Protocol):
    def __call__(self, *jobs: dict[str, Any], names: tuple[str, ...] = ("a",)) -> list[Replica]: ...


@pytest.fixture
def hosts(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    run_graphsync: RunGraphsync,
    relay: StorageRelay,
    exports: Exports,
    tmp_path: Path,
) -> Hosts:
    """Replicas on hosts of their own, exporting ``jobs`` to the test's container through the relay."""

    def make(*jobs: dict[str, Any], names: tuple[str, ...] = ("a",)) -> list[Replica]:
        config = graphsync_config(
            extra={
                "graph": {"endpoint": fake_graph.base_url},
                "storage": {"connection_string": relay.connection_string},
                "output": {"container": exports.name},
                "jobs": list(jobs),
            }
        )
        return [Replica(name, tmp_path, run_graphsync, config) for name in names]

    return make


# -- a no-op round ---------------------------------------------------------------------------------------------


def test_a_round_without_changes_publishes_nothing_and_still_records_the_success_blob(
    hosts: Hosts,
    fake_graph: FakeGraph,
    relay: StorageRelay,
    exports: Exports,
) -> None:
    populate(fake_graph, TENANT, users=2000, groups=0)
    (replica,) = hosts(USERS_JOB)
    replica.sync()
    _, etag, _ = exports.published("users")
    first = exports.state("users")

    relay.reset()
    replica.sync()
    _, etag_after, _ = exports.published("users")
    second = exports.state("users")
    assert etag_after == etag, "a round that received nothing must not publish a snapshot"
    assert second["last_run_id"] != first["last_run_id"] and second["last_success"] >= first["last_success"]
    assert second["delta_link"] and second["changes"] == 0 and second["objects"] == 2000
    records = relay.records()
    touched = {(r.method, r.blob, r.comp) for r in records if r.blob.startswith(f"{exports.name}/{TENANT}/users/")}
    # The warm store needs no download and nothing is written but state.json: no snapshot, no change file.
    assert touched <= {
        ("HEAD", exports.snapshot_blob("users"), None),
        ("GET", f"{exports.name}/{TENANT}/users/state.json", None),
        ("PUT", f"{exports.name}/{TENANT}/users/state.json", None),
    }, touched
    assert sum(r.body_down for r in records) < 10_000


def test_a_round_without_changes_leaves_the_directory_snapshot_file_alone(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, tmp_path: Path
) -> None:
    populate(fake_graph, TENANT, users=500, groups=20)
    output = tmp_path / "out"
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(output)},
            "jobs": [USERS_JOB, GROUPS_JOB],
        }
    )
    replica = Replica("a", tmp_path, run_graphsync, config)
    replica.sync()
    files = {job: output / TENANT / job / "snapshot.jsonl" for job in ("users", "groups")}
    before = {job: (path.stat().st_ino, path.stat().st_mtime_ns) for job, path in files.items()}
    states = {job: json.loads((output / TENANT / job / "state.json").read_text()) for job in files}

    fake_graph.update(TENANT, "users", next(iter(fake_graph.objects(TENANT, "users"))), jobTitle="Changed")
    replica.sync()
    after = {job: (path.stat().st_ino, path.stat().st_mtime_ns) for job, path in files.items()}
    assert after["groups"] == before["groups"], "groups received nothing: its file must not be rewritten"
    assert after["users"] != before["users"], "users changed: its file is replaced"
    groups_state = json.loads((output / TENANT / "groups" / "state.json").read_text())
    assert groups_state["last_run_id"] != states["groups"]["last_run_id"] and groups_state["last_error"] is None
    assert len(list((output / TENANT / "groups" / "changes").iterdir())) == 1  # only the first, full round's


# -- a round with k changes ------------------------------------------------------------------------------------


def test_a_round_with_k_changes_stages_only_their_chunks_and_equals_a_fresh_serialization(
    hosts: Hosts,
    fake_graph: FakeGraph,
    relay: StorageRelay,
    exports: Exports,
) -> None:
    populate(fake_graph, TENANT, users=5000, groups=0)
    (replica,) = hosts(USERS_JOB)
    replica.sync()
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
    _, _, blocks_before = exports.published("users")
    assert len(blocks_before) > 50

    for k in (1, 7, 40):
        changed = random.Random(k).sample(sorted(fake_graph.objects(TENANT, "users")), k)
        for oid in changed:
            fake_graph.update(TENANT, "users", oid, jobTitle=f"Round {k}")
        relay.reset()
        replica.sync()
        exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
        fresh = list(chunk_lines(fresh_serialization(fake_graph, "users")))
        holding = {c.ref.block_id for c in fresh if any(c.ref.first_id <= oid <= c.ref.last_id for oid in changed)}
        staged = exports.snapshot_requests(relay.records(), "users", "PUT", "block")
        assert len(staged) == len(holding), f"k={k}: staged {len(staged)} blocks, {len(holding)} chunks changed"
        staged_bytes = sum(r.bytes_up for r in staged)
        assert staged_bytes < sum(c.ref.size for c in fresh if c.ref.block_id in holding) + 2000 * len(staged)
        assert not exports.snapshot_requests(relay.records(), "users", "GET"), "a warm store downloads nothing"


# -- two replicas, 15 random rounds ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_replicas_alternating_over_15_random_rounds_publish_exact_snapshots_and_fetch_only_changed_chunks(
    hosts: Hosts,
    fake_graph: FakeGraph,
    relay: StorageRelay,
    exports: Exports,
) -> None:
    """The replica that ran the first (full) round keeps a whole store: stale, it reads the blocks it lacks. The
    other one never holds the whole snapshot: each of its rounds reads only the chunks around what it touched."""
    populate(fake_graph, TENANT, users=3000, groups=150, seed=11)
    replicas = hosts(USERS_JOB, GROUPS_JOB, names=("a", "b"))
    known: dict[tuple[str, str], dict[str, int]] = {}  # (replica, job) -> blocks its store holds
    rng = random.Random(30)
    stale_rounds = cold_rounds = 0
    # Seeded, so the walk is the same every time: its rounds have a replica catch up on a stale store 5 times and
    # run without a store 5 times.
    for round_no in range(15):
        if round_no:
            mutate(fake_graph, TENANT, rng, changes=rng.choice((1, 5, 20, 60)))
        replica = rng.choice(replicas)
        before = {job: exports.published(job) if round_no else (b"", "", []) for job in ("users", "groups")}
        changes_before = {job: exports.change_files(job) for job in ("users", "groups")}
        relay.reset()
        replica.sync()
        for job in ("users", "groups"):
            exports.assert_equals_fresh_serialization(fake_graph, job, job)
            fetched = sum(r.body_down for r in exports.snapshot_requests(relay.records(), job, "GET") if r.ranged)
            held = known.get((replica.name, job), {})
            if held or not round_no:
                lacking = sum(size for block, size in before[job][2] if block not in held)
                assert fetched == lacking, (
                    f"round {round_no}, {replica.name}/{job}: fetched {fetched}, lacked {lacking}"
                )
                stale_rounds += bool(lacking) and bool(held)
                known[(replica.name, job)] = dict(exports.published(job)[2])
            else:
                touched = exports.ids_in(exports.change_files(job) - changes_before[job])
                _, needed = cold_reads(before[job][0], exports.published(job)[2], touched)
                assert fetched == needed, f"round {round_no}, {replica.name}/{job}: fetched {fetched}, needed {needed}"
                cold_rounds += 1
    assert stale_rounds >= 5, "the random walk should have made a replica catch up on a stale store several times"
    assert cold_rounds >= 5, "the random walk should have run the replica without a store several times"


# -- damaged or mismatched stores --------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    if how == "corrupt":
        with open(path, "r+b") as file:
            file.seek(path.stat().st_size // 2)
            file.write(os.urandom(8192))
    elif how == "truncated":
        os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("how", ["corrupt", "truncated", "other_version", "changed_select"])
def test_a_damaged_or_mismatched_store_is_rebuilt_and_the_run_is_exact(
    hosts: Hosts,
    fake_graph: FakeGraph,
    relay: StorageRelay,
    exports: Exports,
    how: str,
) -> None:
    populate(fake_graph, TENANT, users=3000, groups=0, seed=5)
    (replica,) = hosts(USERS_JOB)
    replica.sync()
    rng = random.Random(105)
    mutate(fake_graph, TENANT, rng, changes=15)
    if how == "changed_select":
        (replica,) = hosts(USERS_JOB | {"select": ["displayName", "mail"]})  # the same host, a new config
    elif how == "other_version":  # the store of an older version: a round published since, then it came back
        older = replica.store("users").read_bytes()
        replica.sync()
        replica.store("users").write_bytes(older)
        with sqlite3.connect(replica.store("users")) as db:
            assert (
                db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0]
                != exports.published("users")[1]
            )
        mutate(fake_graph, TENANT, rng, changes=15)
    else:
        _damage(replica.store("users"), how)
    relay.reset()
    result = replica.sync()
    if how in ("corrupt", "truncated"):
        assert "working store of" in result.stderr and "damaged" in result.stderr, result.stderr
    data, _, _ = exports.published("users")
    if how == "changed_select":
        expected = {
            oid: {"id": oid, "displayName": o.get("displayName"), "mail": o.get("mail")}
            for oid, o in fake_graph.objects(TENANT, "users").items()
        }
        assert_same(parse_snapshot(data), expected, "users after the select changed")
        assert exports.state("users")["changes"] == len(expected)  # a full round
    else:
        exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
        assert exports.snapshot_requests(relay.records(), "users", "GET"), (
            "the store was refreshed from the published one"
        )
    # And the rebuilt store is warm for the next round.
    relay.reset()
    replica.sync()
    assert not exports.snapshot_requests(relay.records(), "users", "GET")


# -- a kill or a lost lock between staging and commit ------------------------------------------------------------


def break_job_lease(azurite: Azurite, exports: Exports, job: str) -> None:
    lock = BlobServiceClient.from_connection_string(azurite.connection_string).get_blob_client(
        exports.name, f"locks/{TENANT}/{job}.lock"
    )
    BlobLeaseClient(lock).break_lease(lease_break_period=0)


def commit_of(exports: Exports, job: str) -> Callable[[str, str, str | None], bool]:
    """Matches the Put Block List that would publish ``job``'s snapshot."""
    return lambda method, blob, comp: (method, blob, comp) == ("PUT", exports.snapshot_blob(job), "blocklist")


def test_sigkill_between_staging_and_commit_publishes_nothing_and_the_next_run_is_exact(
    hosts: Hosts,
    fake_graph: FakeGraph,
    relay: StorageRelay,
    exports: Exports,
    azurite: Azurite,
) -> None:
    populate(fake_graph, TENANT, users=3000, groups=0, seed=9)
    (replica,) = hosts(USERS_JOB)
    replica.sync()
    _, etag, _ = exports.published("users")
    cursor = exports.state("users")
    mutate(fake_graph, TENANT, random.Random(109), changes=30)

    hold = relay.hold(commit_of(exports, "users"))
    process = replica.start()
    try:
        assert hold.arrived.wait(60), "the run never reached its commit"
        staged = exports.snapshot_requests(relay.records(), "users", "PUT", "block")
        assert staged, "blocks were staged before the commit"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        hold.drop()
        if process.poll() is None:
            process.kill()
    assert exports.published("users")[1] == etag, "nothing is published by a run killed before its commit"
    assert exports.state("users") == cursor, "the cursor did not move"

    # The dead run's lease would expire in 30 s; break it as an operator would, then run again. Its store was
    # rolled back by SQLite's journal, so it is still warm.
    break_job_lease(azurite, exports, "users")
    relay.reset()
    replica.sync()
    assert not exports.snapshot_requests(relay.records(), "users", "GET"), "still warm for the published version"
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")


def test_a_lost_lock_before_commit_publishes_nothing_and_the_next_run_is_exact(
    hosts: Hosts,
    fake_graph: FakeGraph,
    relay: StorageRelay,
    exports: Exports,
    azurite: Azurite,
) -> None:
    populate(fake_graph, TENANT, users=3000, groups=0, seed=13)
    a, b = hosts(USERS_JOB, names=("a", "b"))
    a.sync()
    mutate(fake_graph, TENANT, random.Random(113), changes=30)

    hold = relay.hold(commit_of(exports, "users"))
    process = a.start()
    try:
        assert hold.arrived.wait(60), "A never reached its commit"
        # A stalls at its commit; meanwhile its lease is broken and B runs the job to the end.
        break_job_lease(azurite, exports, "users")
        mutate(fake_graph, TENANT, random.Random(114), changes=10)
        b.sync()
        after_b = exports.published("users")
        hold.release()
        out, err = process.communicate(timeout=60)
    finally:
        hold.drop()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, out + err
    assert "published nothing" in err, err
    assert exports.published("users") == after_b, "A's commit must not land over B's snapshot"
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
    a.sync()  # A's store rolled back; it is stale now and catches up from B's chunks
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")


# -- snapshots this version did not write -------------------------------------------------------------------------


def _snapshot_client(azurite: Azurite, exports: Exports, job: str) -> BlobClient:
    return BlobServiceClient.from_connection_string(azurite.connection_string).get_blob_client(
        exports.name, f"{TENANT}/{job}/snapshot.jsonl"
    )


def test_a_snapshot_rewritten_whole_by_put_blob_is_read_whole_and_never_taken_for_empty(
    hosts: Hosts, fake_graph: FakeGraph, exports: Exports, azurite: Azurite
) -> None:
    """An operator restores the file with one Put Blob (azcopy, the portal): content, but no committed blocks."""
    populate(fake_graph, TENANT, users=600, groups=0, seed=3)
    (replica,) = hosts(USERS_JOB)
    replica.sync()
    data, _, _ = exports.published("users")
    blob = _snapshot_client(azurite, exports, "users")
    blob.upload_blob(data, overwrite=True)
    assert blob.get_block_list("committed")[0] == []
    fake_graph.update(TENANT, "users", sorted(fake_graph.objects(TENANT, "users"))[0], jobTitle="Restored")
    replica.sync()
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")


@pytest.mark.parametrize("aligned", [True, False], ids=["blocks_of_whole_lines", "blocks_cutting_lines"])
def test_a_snapshot_written_by_the_previous_version_migrates_exactly(
    hosts: Hosts, fake_graph: FakeGraph, relay: StorageRelay, exports: Exports, azurite: Azurite, aligned: bool
) -> None:
    """The previous version committed ~4 MiB blocks of whole lines with random IDs; anything else may cut lines."""
    populate(fake_graph, TENANT, users=1500, groups=0, seed=4)
    (replica,) = hosts(USERS_JOB)
    replica.sync()
    data, _, _ = exports.published("users")
    if aligned:
        lines = data.splitlines(keepends=True)
        parts = [b"".join(lines[i : i + 400]) for i in range(0, len(lines), 400)]
    else:
        parts = [data[i : i + 50_000] for i in range(0, len(data), 50_000)]
    blob = _snapshot_client(azurite, exports, "users")
    block_ids = [uuid.uuid4().hex for _ in parts]
    for block, part in zip(block_ids, parts, strict=True):
        blob.stage_block(block, part)
    blob.commit_block_list([BlobBlock(block) for block in block_ids])
    mutate(fake_graph, TENANT, random.Random(107), changes=20)
    replica.sync()
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
    mutate(fake_graph, TENANT, random.Random(108), changes=5)
    relay.reset()
    replica.sync()
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
    assert not exports.snapshot_requests(relay.records(), "users", "GET"), "warm again once it published"


def test_an_empty_snapshot_passes_between_replicas(hosts: Hosts, fake_graph: FakeGraph, exports: Exports) -> None:
    a, b = hosts(USERS_JOB, names=("a", "b"))
    a.sync()
    assert exports.published("users")[0] == b""
    b.sync()
    fake_graph.add(TENANT, "users", {"id": "ü-1", "displayName": "Ünal"})  # a non-ASCII id, sorted as Python does
    b.sync()
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
    a.sync()
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")


def test_a_second_process_on_the_host_never_shares_the_store_in_use(
    hosts: Hosts, fake_graph: FakeGraph, exports: Exports
) -> None:
    """While one process holds a (tenant, job)'s store (here: this test, as a `run` beside a manual `sync` would),
    another works in a throwaway store: correct output, the held store untouched."""
    populate(fake_graph, TENANT, users=800, groups=0, seed=21)
    (replica,) = hosts(USERS_JOB)
    replica.sync()
    store = replica.store("users")
    before = store.read_bytes()
    mutate(fake_graph, TENANT, random.Random(121), changes=10)
    with open(store.parent / "store.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = replica.sync()
        assert "in use by another process on this host" in result.stderr, result.stderr
        assert store.read_bytes() == before, "the store in use was not touched"
        assert not list(store.parent.parent.glob("graphsync-throwaway-*")), "the throwaway store is gone"
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
    replica.sync()  # the held store catches up from the published chunks
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")


# -- a host without a working store ------------------------------------------------------------------------------

JOBS = ("users", "groups")


def test_new_hosts_read_only_the_chunks_holding_what_their_rounds_touch_and_publish_fresh_serializations(
    hosts: Hosts,
    fake_graph: FakeGraph,
    relay: StorageRelay,
    exports: Exports,
) -> None:
    """Every round runs on a host that never ran the job: creates, partial updates, cleared properties, soft and
    hard deletes, restores and member changes must all land on the published objects, and the host reads the
    index plus exactly the chunks where the touched ids are (and those the new cut walks into), nothing else."""
    populate(fake_graph, TENANT, users=6000, groups=200, seed=17)
    names = tuple(f"new{n}" for n in range(8))
    first, *others = hosts(USERS_JOB, GROUPS_JOB, names=("first", *names))
    first.sync()
    rng = random.Random(117)
    done: list[str] = []
    neighbours = 0
    for replica in others:
        done += mutate(fake_graph, TENANT, rng, changes=15)
        before = {job: exports.published(job) for job in JOBS}
        index_before = {job: exports.index(job).download_blob().readall() for job in JOBS}
        changes_before = {job: exports.change_files(job) for job in JOBS}
        relay.reset()
        replica.sync()
        records = relay.records()
        for job in JOBS:
            exports.assert_equals_fresh_serialization(fake_graph, job, job)
            assert exports.state(job)["objects"] == len(fake_graph.objects(TENANT, job)), "counted from the index"
            reads = exports.snapshot_requests(records, job, "GET")
            assert all(r.ranged for r in reads), "a host without a store never downloads the snapshot whole"
            touched = exports.ids_in(exports.change_files(job) - changes_before[job])
            old = before[job][0]
            covering, needed = cold_reads(old, exports.published(job)[2], touched)
            fetched = sum(r.body_down for r in reads)
            assert fetched == needed, f"{replica.name}/{job}: fetched {fetched}, needed {needed}"
            if job == "users":  # ~94 chunks, ~15 of them touched (groups: 4 chunks, often all touched)
                assert fetched < len(old) / 3, f"{replica.name}/{job}: read {fetched} of {len(old)} bytes"
            neighbours += fetched > covering
            index_reads = [r for r in records if r.blob == exports.index_blob(job) and r.method == "GET"]
            assert [r.body_down for r in index_reads] == [len(index_before[job])], "the index, once"
            assert exports.index_matches_the_snapshot(job), "the new version's index is published with it"
    for kind in ("add user", "update user", "clear user", "soft-delete", "hard-delete", "restore", "members"):
        assert any(kind in change for change in done), f"the walk never made a change of kind {kind!r}"
    assert neighbours, "some round should have cut into a chunk next to the touched ones"


def index_write_of(exports: Exports, job: str) -> Callable[[str, str, str | None], bool]:
    """Matches the Put Blob that writes ``job``'s index (after its snapshot's commit)."""
    return lambda method, blob, comp: (method, blob, comp) == ("PUT", exports.index_blob(job), None)


@pytest.mark.parametrize("index", ["killed_before_its_write", "of_an_older_version", "damaged", "absent"])
def test_an_index_that_does_not_match_the_committed_blocks_makes_a_new_host_read_the_blocks_and_stay_exact(
    hosts: Hosts,
    fake_graph: FakeGraph,
    relay: StorageRelay,
    exports: Exports,
    azurite: Azurite,
    index: str,
) -> None:
    """``absent`` is a snapshot written by the previous graphsync, which wrote the same blocks and no index."""
    populate(fake_graph, TENANT, users=3000, groups=0, seed=23)
    a, b, c = hosts(USERS_JOB, names=("a", "b", "c"))
    a.sync()
    rng = random.Random(123)
    if index == "killed_before_its_write":
        mutate(fake_graph, TENANT, rng, changes=20)
        hold = relay.hold(index_write_of(exports, "users"))
        process = a.start()
        try:
            assert hold.arrived.wait(60), "the run never reached its index write"
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        finally:
            hold.drop()
            if process.poll() is None:
                process.kill()
        break_job_lease(azurite, exports, "users")
    elif index == "of_an_older_version":  # also what a writer that lost the race would leave
        older = exports.index("users").download_blob().readall()
        mutate(fake_graph, TENANT, rng, changes=20)
        a.sync()
        exports.index("users").upload_blob(older, overwrite=True)
    elif index == "damaged":
        exports.index("users").upload_blob(b"\x1f\x8b" + os.urandom(200), overwrite=True)
    else:
        exports.index("users").delete_blob()
    assert not exports.index_matches_the_snapshot("users")

    mutate(fake_graph, TENANT, rng, changes=20)
    data, _, _ = exports.published("users")
    relay.reset()
    b.sync()
    reads = exports.snapshot_requests(relay.records(), "users", "GET")
    assert sum(r.body_down for r in reads) == len(data), "the blocks are read as before the index existed"
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
    assert exports.index_matches_the_snapshot("users"), "the next publish writes a matching index"

    mutate(fake_graph, TENANT, rng, changes=5)
    data, _, _ = exports.published("users")
    relay.reset()
    c.sync()
    fetched = sum(r.body_down for r in exports.snapshot_requests(relay.records(), "users", "GET"))
    assert 0 < fetched < len(data) / 3, "with a matching index again, a new host reads a few chunks"
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")


def test_an_index_write_that_lost_the_race_never_lands_over_the_newer_one(
    hosts: Hosts,
    fake_graph: FakeGraph,
    relay: StorageRelay,
    exports: Exports,
    azurite: Azurite,
) -> None:
    """A commits its snapshot and stalls before writing the index; its lease is broken and B publishes over A's
    snapshot, index included. A's index, written last, must not replace B's."""
    populate(fake_graph, TENANT, users=3000, groups=0, seed=29)
    a, b, c = hosts(USERS_JOB, names=("a", "b", "c"))
    a.sync()
    mutate(fake_graph, TENANT, random.Random(129), changes=20)
    hold = relay.hold(index_write_of(exports, "users"))
    process = a.start()
    try:
        assert hold.arrived.wait(60), "A never reached its index write"
        break_job_lease(azurite, exports, "users")
        mutate(fake_graph, TENANT, random.Random(130), changes=10)
        b.sync()
        after_b = exports.index("users").download_blob().readall()
        assert exports.index_matches_the_snapshot("users")
        hold.release()
        process.communicate(timeout=60)
    finally:
        hold.drop()
        if process.poll() is None:
            process.kill()
    assert exports.index("users").download_blob().readall() == after_b, "A's late index must not land"
    put = [r for r in relay.records() if r.blob == exports.index_blob("users") and r.method == "PUT"]
    assert [r.status for r in put][-1] == 412, "A's write was refused by If-Match"
    mutate(fake_graph, TENANT, random.Random(131), changes=5)
    data, _, _ = exports.published("users")
    relay.reset()
    c.sync()
    fetched = sum(r.body_down for r in exports.snapshot_requests(relay.records(), "users", "GET"))
    assert 0 < fetched < len(data) / 3
    exports.assert_equals_fresh_serialization(fake_graph, "users", "users")
