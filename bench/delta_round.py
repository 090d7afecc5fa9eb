"""Benchmark: what a delta round costs in storage bytes, storage requests, Graph requests, wall time and CPU.

One `users` job with blob output (``[output] container``), N users (default 100,000; ``--users 100000,300000``),
against the fake Graph (users delta pages of 200, as Graph serves them), the fake Entra and Azurite behind
``tests.fakes.storage_relay.StorageRelay``, which counts every storage request and byte each way (headers
included). Each round is a real ``graphsync sync`` process; its CPU is its own user + system time.

Rounds, in this order, each a row of the table and a ratio to the full round:

1. **full** — replica A's first round: the whole directory is fetched, chunked, uploaded.
2. **new host, 0 changes** — replica B's first round: no store on B; nothing to apply, so it reads only the block
   list and the snapshot's index.
3. **warm, 0 / 10 / 100 changes** — replica A again: its store matches the published snapshot.
4. **stale, 100 changes** — replica B, whose store is two published rounds behind (110 changes): it reads only
   the chunks that changed since, then publishes. This is the fleet's takeover case (the last runner died).
   B's store is a copy of A's, taken after "warm, 0 changes" (as if B had run the job then): a host without a
   store no longer reads the whole snapshot, so this is how B holds an older version.
5. **warm, 1000 changes** — replica B again, now warm.
6. **new host, 100 changes** — replica C, with no store (a new replica, the CronJob's ``emptyDir``): it reads the
   index and only the chunks holding the 100 changed users (and any neighbour the new cut reaches), then publishes.

Every published snapshot is checked to be byte-identical to a from-scratch serialization of the fake directory,
or the benchmark fails. Run from the repository root: ``.venv/bin/python bench/delta_round.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
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
    positive_int_list,
    run_line,
    start_azurite,
    write_test_ca,
)

from tests.conftest import REPO_ROOT, dumps_toml

TENANT = "contoso.onmicrosoft.com"
JOB = "users"
SELECT = ["displayName", "givenName", "surname", "mail", "userPrincipalName", "jobTitle"]
PAGE_SIZE = 200  # what Graph serves on users delta (see FACTS.md)


@dataclass
class Round:
    name: str
    replica: str
    changes: int
    bytes_up: int
    bytes_down: int
    storage_requests: int
    graph_requests: int
    wall_seconds: float
    cpu_seconds: float
    snapshot_bytes: int
    chunks: int


class Bench:
    def __init__(self, workdir: Path, ca_bundle: Path, relay: Any, entra: Any, graph: Any, users: int) -> None:
        self.workdir = workdir
        self.relay = relay
        self.graph = graph
        self.users = users
        self.rng = random.Random(users)
        self.container = f"exports-{users}"  # each size its own: state.json holds the fake's delta links
        from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET

        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "graphsync.toml"
        self.config.write_text(
            dumps_toml(
                {
                    "log_level": "WARNING",
                    "identity": {
                        "client_id": CLIENT_ID,
                        "tenants": [TENANT],
                        "authority_host": entra.authority_host,
                        "client_secret": CLIENT_SECRET,
                    },
                    "storage": {"connection_string": relay.connection_string, "container": f"graphsync-{users}"},
                    "graph": {"endpoint": graph.base_url},
                    "output": {"container": self.container},
                    "jobs": [{"name": JOB, "resource": "users", "delta": True, "select": SELECT, "every": "1h"}],
                }
            )
        )
        self.env = {**os.environ, "REQUESTS_CA_BUNDLE": str(ca_bundle), "PYTHONUNBUFFERED": "1"}

    def change(self, count: int) -> None:
        """``count`` distinct users get a new job title."""
        ids = sorted(self.graph.objects(TENANT, "users"))
        for oid in self.rng.sample(ids, count):
            self.graph.update(TENANT, "users", oid, jobTitle=f"Title {self.rng.randrange(10**6)}")

    def round(self, name: str, replica: str, changes: int) -> Round:
        if changes:
            self.change(changes)
        self.relay.reset()
        graph_before = len(self.graph.requests)
        cpu_before = _children_cpu()
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "graphsync", "sync", "--config", str(self.config)],
            cwd=REPO_ROOT,
            env={**self.env, "XDG_CACHE_HOME": str(self.workdir / replica)},
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        wall = time.monotonic() - started
        cpu = _children_cpu() - cpu_before
        if result.returncode != 0:
            raise BenchFailure(f"round {name!r} exited {result.returncode}: {result.stdout}\n{result.stderr[-3000:]}")
        records = self.relay.records()
        graph_requests = sum(1 for r in self.graph.requests[graph_before:] if r.path.startswith("/v1.0/"))
        data, chunks = self._check()
        print(f"  {name}: {wall:.1f} s", file=sys.stderr, flush=True)
        return Round(
            name,
            replica,
            changes,
            sum(r.bytes_up for r in records),
            sum(r.bytes_down for r in records),
            len(records),
            graph_requests,
            wall,
            cpu,
            len(data),
            chunks,
        )

    def copy_store(self, source: str, target: str) -> None:
        """Give ``target`` the working stores ``source`` holds now, as if it had run the jobs itself."""
        work = Path("graphsync") / "work"
        shutil.rmtree(self.workdir / target / work, ignore_errors=True)
        shutil.copytree(self.workdir / source / work, self.workdir / target / work)

    def _check(self) -> tuple[bytes, int]:
        """The published snapshot must equal a from-scratch serialization of the fake directory, byte for byte."""
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.relay.direct_connection_string) as service:
            blob = service.get_blob_client(self.container, f"{TENANT}/{JOB}/snapshot.jsonl")
            data = blob.download_blob().readall()
            committed, _ = blob.get_block_list("committed")
        objects = self.graph.objects(TENANT, "users")
        fresh = b"".join(
            json.dumps(
                {"id": oid, **{key: objects[oid].get(key) for key in SELECT}},
                separators=(",", ":"),
                sort_keys=True,
                ensure_ascii=False,
            ).encode()
            + b"\n"
            for oid in sorted(objects)
        )
        if data != fresh:
            raise BenchFailure("the published snapshot differs from a from-scratch serialization")
        return data, len(committed)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(users: int, workdir: Path, ca: Any, ca_bundle: Path, azurite: Any) -> list[Round]:
    from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
    from tests.fakes.graph import FakeGraph, populate
    from tests.fakes.storage_relay import StorageRelay

    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(StorageRelay(azurite))
        entra = stack.enter_context(FakeEntra(ca, client_id=CLIENT_ID, client_secret=CLIENT_SECRET))
        graph = stack.enter_context(FakeGraph(ca, entra, page_size=PAGE_SIZE))
        print(f"populating the fake Graph with {users:,} users ...", file=sys.stderr, flush=True)
        populate(graph, TENANT, users, 0, seed=users)
        bench = Bench(workdir / f"n{users}", ca_bundle, relay, entra, graph, users)
        rounds = [
            bench.round("full", "a", 0),
            bench.round("new host, 0 changes", "b", 0),
            bench.round("warm, 0 changes", "a", 0),
        ]
        bench.copy_store("a", "b")
        return [
            *rounds,
            bench.round("warm, 10 changes", "a", 10),
            bench.round("warm, 100 changes", "a", 100),
            bench.round("stale, 100 changes", "b", 100),
            bench.round("warm, 1000 changes", "b", 1000),
            bench.round("new host, 100 changes", "c", 100),
        ]


def _ratio(value: float, full: float) -> str:
    return f"{100 * value / full:.2f} %" if full else "-"


def report(users: int, rounds: list[Round]) -> str:
    full = rounds[0]
    total = full.bytes_up + full.bytes_down
    lines = [
        f"\n{users:,} users, snapshot {full.snapshot_bytes / 1e6:.1f} MB in {full.chunks:,} chunks",
        "",
        "| round | replica | storage MB up / down | storage bytes, up + down | storage requests | Graph requests "
        "| wall s | CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        lines.append(
            f"| {r.name} | {r.replica} | {r.bytes_up / 1e6:.2f} / {r.bytes_down / 1e6:.2f} "
            f"| {_ratio(r.bytes_up + r.bytes_down, total)} "
            f"| {r.storage_requests} ({_ratio(r.storage_requests, full.storage_requests)}) "
            f"| {r.graph_requests} ({_ratio(r.graph_requests, full.graph_requests)}) "
            f"| {r.wall_seconds:.2f} ({_ratio(r.wall_seconds, full.wall_seconds)}) "
            f"| {r.cpu_seconds:.2f} ({_ratio(r.cpu_seconds, full.cpu_seconds)}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--users", type=positive_int_list("100000,300000"), default=[100_000])
    add_json_option(parser)
    args = parser.parse_args(argv)

    from graphsync import __version__
    from tests.fakes.azurite import azurite_version

    started = time.monotonic()
    results: dict[int, list[Round]] = {}
    with contextlib.ExitStack() as stack:
        try:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphsync-bench-delta-")))
            ca, ca_bundle = write_test_ca(workdir)
            azurite = start_azurite(stack, workdir)
            for users in args.users:
                results[users] = run(users, workdir, ca, ca_bundle, azurite)
        except (BenchFailure, RuntimeError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    print(f"command: {command_line(argv)}")
    print(
        f"graphsync {__version__}, Azurite {azurite_version()}, azure-storage-blob "
        f"{package_version('azure-storage-blob')}, {os.cpu_count()} CPUs; {run_line(started)}"
    )
    print("Storage bytes count request and response lines, headers and bodies. Ratios are to the full round.")
    for users, rounds in results.items():
        print(report(users, rounds))
    if args.json:
        dump_json(args.json, {str(users): [asdict(r) for r in rounds] for users, rounds in results.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
