"""Benchmark: what the Delta Lake tables ([output] tables = true) add to a round, and what many writers cost.

Three parts, all against Azurite behind ``tests.fakes.storage_relay.StorageRelay`` (every storage request and byte
counted, headers included):

1. **Rounds**: one tenant, N users (default 100,000; ``--users``) and G groups (default 5,000; ``--groups``) with
   members, a users job (with manager) and a groups job (members, owners), run as real ``graphsync sync``
   processes into two outputs, one without tables and one with, over the same fake Graph (each change applied
   once, then both run): a full round, then rounds with 0, 100 and 1,000 changed users (a tenth of them also move
   between groups). Per round and output: storage bytes (and the tables' share of them), requests, wall time.
2. **Many writers**: T tenants (default 200; ``--tenants``) x 2 jobs (users, groups) committing their first round
   to the same tables at once, from 8 threads as one replica's pool would: commits, conflicts retried by
   graphsync, delta-rs's own retries (from the commits' ``num_retries``), log files, and the time and requests to
   read the table afterwards.
3. **Reading after many commits**: one table after 20 and after C commits (default 2,000; ``--commits``): wall
   time and requests to open and read it (checkpoints keep this flat).

Targets (from issue 14): a 100-change round with tables costs at most 25 % of a full round's storage bytes and adds
at most 1 s; a 0-change round adds 0 table bytes; reading after 2,000 commits is no slower than after 20.
Run from the repository root: ``.venv/bin/python bench/tables.py``. The machine may be shared: compare ratios.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    BenchFailure,
    add_json_option,
    bench_parser,
    command_line,
    dump_json,
    package_version,
    run_line,
    start_azurite,
    write_test_ca,
)
from delta_round import PAGE_SIZE, SELECT, TENANT, Bench

from tests.conftest import dumps_toml

TABLES_PREFIX = "/tables/"


@dataclass
class Pair:
    """One round, run into the output without tables and into the one with."""

    name: str
    plain_bytes: int
    tables_bytes: int
    table_bytes: int  # of tables_bytes: requests under tables/ (up + down)
    table_bytes_written: int  # of those: sent up by PUT requests (data files, log entries, checkpoints)
    plain_requests: int
    tables_requests: int
    plain_seconds: float
    tables_seconds: float
    by_table: dict[str, list[int]]  # table -> [bytes read, bytes written], in the round with tables


class Output(Bench):
    """delta_round's Bench (one `graphsync sync` per round, the users snapshot checked byte for byte), with a groups
    job beside the users job and, for one of the two outputs, tables."""

    def __init__(self, workdir: Path, ca_bundle: Path, relay: Any, entra: Any, graph: Any, users: int, tables: bool):
        super().__init__(workdir, ca_bundle, relay, entra, graph, users)
        self.container = f"exports-{users}-{'tables' if tables else 'plain'}"
        config = _read_toml(self.config)
        config["output"] = {"container": self.container, "tables": tables}
        config["jobs"] = [
            {"name": "users", "resource": "users", "delta": True, "select": SELECT, "every": "1h"},
            {
                "name": "groups",
                "resource": "groups",
                "delta": True,
                "select": ["displayName", "members", "owners"],
                "every": "1h",
            },
        ]
        self.config.write_text(dumps_toml(config))


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


def measure_rounds(users: int, groups: int, workdir: Path, ca: Any, ca_bundle: Path, azurite: Any) -> list[Pair]:
    from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
    from tests.fakes.graph import FakeGraph, populate
    from tests.fakes.storage_relay import StorageRelay

    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(StorageRelay(azurite))
        entra = stack.enter_context(FakeEntra(ca, client_id=CLIENT_ID, client_secret=CLIENT_SECRET))
        graph = stack.enter_context(FakeGraph(ca, entra, page_size=PAGE_SIZE))
        print(f"populating the fake Graph with {users:,} users and {groups:,} groups ...", file=sys.stderr)
        populate(graph, TENANT, users, groups, seed=users)
        outputs = {
            kind: Output(workdir / kind, ca_bundle, relay, entra, graph, users, kind == "tables")
            for kind in ("plain", "tables")
        }
        rng = random.Random(14)
        pairs = []
        for name, changes in (("full", 0), ("0 changes", 0), ("100 changes", 100), ("1,000 changes", 1000)):
            if changes:
                outputs["plain"].change(changes)  # users' job titles, once, seen by both outputs
                ids = sorted(graph.objects(TENANT, "users"))
                for group in rng.sample(sorted(graph.objects(TENANT, "groups")), changes // 10):
                    graph.add_members(TENANT, group, [rng.choice(ids)])
            rounds = {kind: output.round(name, "a", 0) for kind, output in outputs.items()}
            tables = [r for r in relay.records() if TABLES_PREFIX in f"/{r.blob}"]
            by_table: dict[str, list[int]] = {}  # table -> [bytes read, bytes written]
            for r in tables:
                counts = by_table.setdefault(r.blob.split("/")[2], [0, 0])
                counts[r.method == "PUT"] += r.bytes_up + r.bytes_down
            pairs.append(
                Pair(
                    name,
                    rounds["plain"].bytes_up + rounds["plain"].bytes_down,
                    rounds["tables"].bytes_up + rounds["tables"].bytes_down,
                    sum(r.bytes_up + r.bytes_down for r in tables),
                    sum(r.bytes_up for r in tables if r.method == "PUT"),
                    rounds["plain"].storage_requests,
                    rounds["tables"].storage_requests,
                    rounds["plain"].wall_seconds,
                    rounds["tables"].wall_seconds,
                    by_table,
                )
            )
        return pairs


# -- many writers, and reading after many commits (in-process, like a replica's pool) ---------------------


@dataclass
class Writers:
    tenants: int
    commits: int
    conflicts_retried: int
    delta_rs_retries: int
    log_files: int
    seconds: float
    read_seconds: float
    read_requests: int


@dataclass
class Reads:
    commits: int
    open_seconds: float  # the log alone: what checkpoints bound
    open_requests: int
    read_seconds: float  # open and read every row, after the upkeep compacted the commits' small files
    read_requests: int


def _location(relay: Any, container: str) -> Any:
    from graphsync.tables.location import TableLocation
    from tests.fakes.azurite import AZURITE_ACCOUNT, AZURITE_KEY

    endpoint = relay.connection_string.split("BlobEndpoint=")[1].split(";")[0].rstrip("/")
    options = {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY, "endpoint": endpoint, "allow_http": "true"}
    return TableLocation(f"az://{container}/tables", options)


def _timed_read(relay: Any, uri: str, options: dict[str, str], *, data: bool = True) -> tuple[float, int]:
    """Median wall time (of 3) and requests to open a table (its log: checkpoint and commits after it) and, with
    ``data``, read it whole."""
    from deltalake import DeltaTable

    times, requests = [], 0
    for _ in range(3):
        relay.reset()
        started = time.monotonic()
        table = DeltaTable(uri, storage_options=options)
        if data:
            table.to_pyarrow_table()
        times.append(time.monotonic() - started)
        requests = len(relay.records())
    return statistics.median(times), requests


def measure_writers(tenants: int, workdir: Path, azurite: Any) -> Writers:
    from azure.storage.blob import BlobServiceClient
    from deltalake import DeltaTable

    from graphsync.config import JobSettings
    from graphsync.metrics import TABLE_COMMITS, TABLE_CONFLICTS_RETRIED
    from graphsync.snapshot import SnapshotStore
    from graphsync.tables import AppliedRound
    from graphsync.tables.delta import DeltaTables
    from tests.fakes.storage_relay import StorageRelay

    jobs = [
        JobSettings(name="users", resource="users", delta=True, select=["displayName", "jobTitle"], every="1h"),
        JobSettings(name="groups", resource="groups", delta=True, select=["displayName"], every="1h"),
    ]
    names = ["users", "users_history", "groups", "groups_history"]
    with StorageRelay(azurite) as relay, BlobServiceClient.from_connection_string(azurite.connection_string) as blobs:
        container = "writers"
        blobs.create_container(container)
        tables = DeltaTables(_location(relay, container))
        work: list[tuple[str, JobSettings]] = [(f"tenant{n:03d}.example", job) for n in range(tenants) for job in jobs]
        random.Random(1).shuffle(work)
        commits_before = sum(TABLE_COMMITS.labels(name)._value.get() for name in names)
        retried_before = sum(TABLE_CONFLICTS_RETRIED.labels(name)._value.get() for name in names)
        failures: list[BaseException] = []
        lock = threading.Lock()

        def worker(index: int) -> None:
            while True:
                with lock:
                    if not work:
                        return
                    tenant, job = work.pop()
                try:
                    store = SnapshotStore(workdir / f"w-{tenant}-{job.name}.sqlite")
                    records = [
                        {"id": f"{tenant}-{job.name}-{n}", "displayName": f"N{n}", "jobTitle": "T"} for n in range(20)
                    ]
                    store.apply(records)
                    lines = io.BytesIO(b"".join(json.dumps(r).encode() + b"\n" for r in records))
                    touched = {r["id"] for r in records}
                    tables.apply(AppliedRound(tenant, job, True, touched, store, lines, time.time()))
                except BaseException as exc:  # reported below
                    failures.append(exc)

        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
        if failures:
            raise BenchFailure(f"{len(failures)} writers failed, the first: {failures[0]!r}")
        options = tables.location.storage_options
        users = DeltaTable(tables.location.uri("users"), storage_options=options)
        if {r["tenant_id"] for r in users.to_pyarrow_table(columns=["tenant_id"]).to_pylist()} != {
            f"tenant{n:03d}.example" for n in range(tenants)
        }:
            raise BenchFailure("a tenant's rows are missing from the users table")
        log_files, delta_rs_retries = 0, 0
        exports = blobs.get_container_client(container)
        for name in names:  # read straight from Azurite: the log's commitInfo says how often delta-rs retried
            for blob in exports.list_blobs(name_starts_with=f"tables/{name}/_delta_log/"):
                log_files += 1
                if blob.name.endswith(".json") and not blob.name.endswith("_last_checkpoint"):
                    for line in exports.download_blob(blob.name).readall().splitlines():
                        info = json.loads(line).get("commitInfo") or {}
                        delta_rs_retries += int((info.get("operationMetrics") or {}).get("num_retries", 0))
        read_seconds, read_requests = _timed_read(relay, tables.location.uri("users"), options)
        return Writers(
            tenants,
            int(sum(TABLE_COMMITS.labels(name)._value.get() for name in names) - commits_before),
            int(sum(TABLE_CONFLICTS_RETRIED.labels(name)._value.get() for name in names) - retried_before),
            delta_rs_retries,
            log_files,
            seconds,
            read_seconds,
            read_requests,
        )


def measure_reads(commits: int, azurite: Any) -> list[Reads]:
    """A users-like table taking one small commit at a time (as rounds of many tenants do), read after 20 and after
    ``commits`` commits."""
    import pyarrow as pa
    from azure.storage.blob import BlobServiceClient
    from deltalake import DeltaTable, write_deltalake

    from graphsync.tables.delta import CURRENT_PROPERTIES, DeltaTables
    from graphsync.tables.upkeep import maintain
    from tests.fakes.storage_relay import StorageRelay

    with StorageRelay(azurite) as relay, BlobServiceClient.from_connection_string(azurite.connection_string) as blobs:
        blobs.create_container("reads")
        location = _location(relay, "reads")
        tables = DeltaTables(location)
        uri, options = location.uri("log"), location.storage_options
        schema = pa.schema([("tenant_id", pa.string()), ("id", pa.string()), ("value", pa.string())])
        DeltaTable.create(
            uri, schema, partition_by=["tenant_id"], configuration=CURRENT_PROPERTIES, storage_options=options
        )
        results = []
        done = 0
        for target in (20, commits):
            while done < target:
                row = pa.table({"tenant_id": [f"t{done % 20}"], "id": [str(done)], "value": ["x"]}, schema=schema)
                write_deltalake(uri, row, mode="append", storage_options=options)
                done += 1
                if done % 500 == 0:
                    print(f"  {done} commits", file=sys.stderr, flush=True)
            opened = _timed_read(relay, uri, options, data=False)
            maintain(tables, ["log"], lambda: False)  # as the daily upkeep does: one file per tenant partition
            results.append(Reads(target, *opened, *_timed_read(relay, uri, options)))
        return results


# -- report -------------------------------------------------------------------------------------------------


def _pct(value: float, whole: float) -> str:
    return f"{100 * value / whole:.1f} %" if whole else "-"


def report(users: int, groups: int, pairs: list[Pair], writers: Writers | None, reads: list[Reads]) -> str:
    full = pairs[0]
    lines = [
        f"\n1. Rounds: {users:,} users, {groups:,} groups with members, one tenant",
        "",
        "| round | storage MB without / with tables | with tables, % of its full round | table MB (written) "
        "| requests without / with | wall s without / with (added) |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        lines.append(
            f"| {p.name} | {p.plain_bytes / 1e6:.2f} / {p.tables_bytes / 1e6:.2f} "
            f"| {_pct(p.tables_bytes, full.tables_bytes)} "
            f"| {p.table_bytes / 1e6:.2f} ({p.table_bytes_written / 1e6:.2f}) "
            f"| {p.plain_requests} / {p.tables_requests} "
            f"| {p.plain_seconds:.2f} / {p.tables_seconds:.2f} ({p.tables_seconds - p.plain_seconds:+.2f}) |"
        )
    lines.append("\nTable traffic (MB read / written) in the round with tables:")
    for p in pairs[1:]:
        parts = sorted(p.by_table.items(), key=lambda item: -sum(item[1]))
        text = ", ".join(f"{name} {read / 1e6:.2f} / {written / 1e6:.2f}" for name, (read, written) in parts)
        lines.append(f"- {p.name}: {text or 'none'}")
    by_name = {p.name: p for p in pairs}
    hundred, zero = by_name["100 changes"], by_name["0 changes"]
    checks = [
        ("100-change round <= 25 % of a full round's storage bytes", hundred.tables_bytes <= 0.25 * full.tables_bytes),
        ("100-change round adds <= 1 s", hundred.tables_seconds - hundred.plain_seconds <= 1.0),
        ("0-change round adds 0 table bytes", zero.table_bytes == 0),
    ]
    if writers is not None:
        w = writers
        lines += [
            f"\n2. Many writers: {w.tenants} tenants x 2 jobs, 8 threads, one location",
            "",
            "| commits | conflicts retried (graphsync) | delta-rs retries | log files | seconds "
            "| read users: s, requests |",
            "|---|---|---|---|---|---|",
            f"| {w.commits} | {w.conflicts_retried} | {w.delta_rs_retries} | {w.log_files} | {w.seconds:.1f} "
            f"| {w.read_seconds:.2f}, {w.read_requests} |",
        ]
    if reads:
        lines += [
            "\n3. One table (20 tenant partitions, one row per commit) after many commits",
            "",
            "| commits | open (log): s, requests | open and read all rows after upkeep: s, requests |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r.commits:,} | {r.open_seconds:.3f}, {r.open_requests} | {r.read_seconds:.3f}, {r.read_requests} |"
            for r in reads
        ]
        last, first = reads[-1], reads[0]
        checks.append(
            (
                f"reading after {last.commits:,} commits no slower than after 20 (no more requests; wall time, on a "
                "shared machine, within 25 %)",
                last.open_requests <= first.open_requests
                and last.read_requests <= first.read_requests
                and last.open_seconds <= first.open_seconds * 1.25
                and last.read_seconds <= first.read_seconds * 1.25,
            )
        )
    lines += ["", *(f"- {'met' if ok else 'MISSED'}: {what}" for what, ok in checks)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--groups", type=int, default=5_000)
    parser.add_argument("--tenants", type=int, default=200, help="part 2's tenants (0 skips it)")
    parser.add_argument("--commits", type=int, default=2_000, help="part 3's commits (0 skips it)")
    add_json_option(parser)
    args = parser.parse_args(argv)

    from graphsync import __version__
    from tests.fakes.azurite import azurite_version

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphsync-bench-tables-")))
            ca, ca_bundle = write_test_ca(workdir)
            azurite = start_azurite(stack, workdir)
            pairs = measure_rounds(args.users, args.groups, workdir, ca, ca_bundle, azurite)
            print("many writers ...", file=sys.stderr, flush=True)
            writers = measure_writers(args.tenants, workdir, azurite) if args.tenants else None
            print("reading after many commits ...", file=sys.stderr, flush=True)
            reads = measure_reads(args.commits, azurite) if args.commits else []
        except (BenchFailure, RuntimeError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    print(f"command: {command_line(argv)}")
    print(
        f"graphsync {__version__}, deltalake {package_version('deltalake')}, Azurite {azurite_version()}, "
        f"{os.cpu_count()} CPUs (shared with other work); {run_line(started)}"
    )
    print("Storage bytes count request and response lines, headers and bodies, through the counting relay.")
    print(report(args.users, args.groups, pairs, writers, reads))
    if args.json:
        document = {"rounds": [asdict(p) for p in pairs], "writers": asdict(writers) if writers else None}
        dump_json(args.json, document | {"reads": [asdict(r) for r in reads]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
