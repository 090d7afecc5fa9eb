"""Benchmark: many tenants — `graphsync sync` against the serial sum of latencies, and a fleet of `graphsync run`.

Against the local fakes with a per-request latency (Graph ``--graph-latency``, default 0.3 s; identity provider
``--entra-latency``, default 0.15 s), one users job per tenant:

* **sync** — for each size in ``--sizes`` (default 50 and 200 tenants): ``graphsync sync`` with the default pool
  (``[run] concurrency`` 8, ``per_tenant`` 2), then ``graphsync sync --parallel 1`` (today's order, one after the
  other). Each on a fresh output directory, token-cache container and work directory, so both pay for every token
  and full round. Reported: wall time, the serial sum of the latencies the fakes served (Graph requests * Graph
  latency + token requests * identity latency), and the ratios.
* **fleet** — ``--replicas`` (3) ``graphsync run`` processes over ``--fleet-tenants`` (200) tenants, ``every`` =
  ``--every`` (30 s), for ``--slots`` (4) slots after the first. Each replica talks to Azurite through a counting
  relay of its own, so its storage calls are counted exactly. Reported per replica: runs, storage calls, CPU
  seconds (``/proc``), peak RSS (``VmHWM``) and the most threads seen; for the fleet: runs per replica max/mean,
  each slot's drain time (slot start to the last run's end, from the logs), storage calls and CPU per run. Runs
  in the measured slots find nothing new (the directory does not change), which is the fixed cost of a run. The
  output is a blob container (``--fleet-output``), so state.json and snapshot calls are storage calls too.

Run from the repository root: ``.venv/bin/python bench/fleet.py``. Needs the test extras and Azurite, like the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    BenchFailure,
    add_json_option,
    bench_parser,
    command_line,
    dump_json,
    machine_line,
    package_version,
    positive_int_list,
    run_line,
    start_azurite,
    stderr_tail,
    write_test_ca,
)

from tests.fakes.storage_relay import StorageRelay

SELECT = ["displayName", "mail", "jobTitle"]
USERS_PER_TENANT = 20  # one page: a run's Graph cost is one request


# -- results -------------------------------------------------------------------------------------------------


@dataclass
class SyncResult:
    tenants: int
    parallel: str  # "default (8)" or "1"
    wall_seconds: float
    serial_seconds: float
    graph_requests: int
    token_requests: int

    @property
    def share_of_serial(self) -> float:
        return self.wall_seconds / self.serial_seconds


@dataclass
class ReplicaResult:
    name: str
    runs: int = 0
    skipped: int = 0
    busy: int = 0
    storage_calls: int = 0
    cpu_seconds: float = 0.0  # in the measured slots
    peak_rss_mib: float = 0.0
    max_threads: int = 0
    finishes: list[float] = field(default_factory=list)  # when each run ended


@dataclass
class FleetResult:
    tenants: int
    output: str
    every: int
    slots: list[int]
    replicas: list[ReplicaResult]
    drain_seconds: list[float]

    @property
    def runs(self) -> int:
        return sum(r.runs for r in self.replicas)

    @property
    def max_over_mean(self) -> float:
        runs = [r.runs for r in self.replicas]
        return max(runs) / statistics.mean(runs) if any(runs) else 0.0


# -- orchestration -------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, ca_bundle: Path, azurite: Any, entra: Any, graph: Any):
        self.args = args
        self.workdir = workdir
        self.azurite = azurite
        self.entra = entra
        self.graph = graph
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("GRAPHSYNC_")}
        self.env |= {"REQUESTS_CA_BUNDLE": str(ca_bundle), "PYTHONUNBUFFERED": "1"}
        self.env.pop("STATE_DIRECTORY", None)

    def config(self, tenants: list[str], label: str, *, every: str = "1h", blob_output: bool = False) -> Path:
        """A config on a fresh token-cache container, and a fresh output directory (or container)."""
        from azure.storage.blob import BlobServiceClient

        from tests.conftest import dumps_toml
        from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET

        container = f"bench-fleet-{uuid.uuid4().hex[:10]}"
        with BlobServiceClient.from_connection_string(self.azurite.connection_string) as service:
            service.create_container(container)
        path = self.workdir / f"{label}.toml"
        path.write_text(
            dumps_toml(
                {
                    "log_level": "INFO",
                    "identity": {
                        "client_id": CLIENT_ID,
                        "tenants": tenants,
                        "authority_host": self.entra.authority_host,
                        "client_secret": CLIENT_SECRET,
                    },
                    "storage": {"connection_string": self.azurite.connection_string, "container": container},
                    "graph": {"endpoint": self.graph.base_url},
                    "output": {"container": f"{container}-out"}
                    if blob_output
                    else {"directory": str(self.workdir / f"{label}-out")},
                    "jobs": [{"name": "users", "resource": "users", "delta": True, "select": SELECT, "every": every}],
                }
            )
        )
        return path

    def sync(self, tenants: list[str], parallel: int | None) -> SyncResult:
        label = f"sync-{len(tenants)}-{parallel or 'default'}"
        config = self.config(tenants, label)
        command = [sys.executable, "-m", "graphsync", "sync", "--config", str(config)]
        if parallel:
            command += ["--parallel", str(parallel)]
        self.graph.reset_records()
        self.entra.reset()
        env = self.env | {"XDG_CACHE_HOME": str(self.workdir / f"{label}-cache")}
        stderr = self.workdir / f"{label}.stderr"
        started = time.monotonic()
        with stderr.open("w") as err:
            result = subprocess.run(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=self.args.timeout
            )
        wall = time.monotonic() - started
        if result.returncode != 0:
            raise BenchFailure(f"{label} exited {result.returncode}\n{stderr_tail(stderr) or '(no stderr)'}")
        graph_requests = len(self.graph.requests)
        token_requests = len(self.entra.token_requests())
        serial = graph_requests * self.args.graph_latency + token_requests * self.args.entra_latency
        return SyncResult(
            len(tenants),
            str(parallel) if parallel else f"default ({self.args.default_concurrency})",
            wall,
            serial,
            graph_requests,
            token_requests,
        )

    def fleet(self, tenants: list[str]) -> FleetResult:
        every = self.args.every
        relay_stack = contextlib.ExitStack()  # a relay per replica: its storage calls, counted exactly
        relays = [relay_stack.enter_context(StorageRelay(self.azurite)) for _ in range(self.args.replicas)]
        base = self.config(tenants, "fleet", every=f"{every}s", blob_output=self.args.fleet_output == "container")
        processes: list[tuple[subprocess.Popen[bytes], Path, ReplicaResult]] = []
        try:
            for index, relay in enumerate(relays):
                config = self.workdir / f"fleet-{index}.toml"
                text = base.read_text().replace(self.azurite.connection_string, relay.connection_string)
                config.write_text(text)
                log = self.workdir / f"fleet-{index}.log"
                env = self.env | {"XDG_CACHE_HOME": str(self.workdir / f"fleet-{index}-cache")}
                with log.open("w") as out:
                    process = subprocess.Popen(
                        [sys.executable, "-m", "graphsync", "run", "--config", str(config)],
                        cwd=REPO_ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                processes.append((process, log, ReplicaResult(f"replica {index + 1}")))
            # The first slot starts everything (tokens, full rounds); measure whole slots after it.
            first = (int(time.time()) // every + 2) * every
            end = first + self.args.slots * every
            calls_at_start: list[int] = []
            cpu_at_start: list[float] = []
            while time.time() < end + every * 0.9:  # the last measured slot drains within it
                if not calls_at_start and time.time() >= first:
                    calls_at_start = [len(relay.records()) for relay in relays]
                    cpu_at_start = [_cpu_seconds(process.pid) for process, _, _ in processes]
                for process, _, result in processes:
                    if process.poll() is not None:
                        raise BenchFailure(f"{result.name} exited {process.returncode}")
                    result.max_threads = max(result.max_threads, _threads(process.pid))
                time.sleep(0.5)
            for (process, _, result), relay, start_calls, start_cpu in zip(
                processes, relays, calls_at_start, cpu_at_start, strict=True
            ):
                result.storage_calls = len(relay.records()) - start_calls
                result.peak_rss_mib = _status(process.pid, "VmHWM") / 1024
                result.cpu_seconds = _cpu_seconds(process.pid) - start_cpu
        finally:
            for process, _, _ in processes:
                process.terminate()
            for process, _, _ in processes:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
            relay_stack.close()
        slots = list(range(first, end, every))
        for _, log, result in processes:
            _read_log(log, result, first, end)
        drains = []
        for slot in slots:
            ends = [when for _, _, r in processes for when in r.finishes if slot <= when < slot + every]
            drains.append(max(ends) - slot if ends else float("nan"))
        return FleetResult(len(tenants), self.args.fleet_output, every, slots, [r for _, _, r in processes], drains)


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _threads(pid: int) -> int:
    try:
        return _status(pid, "Threads")
    except OSError:
        return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_log(log: Path, result: ReplicaResult, first: float, end: float) -> None:
    """Count the replica's runs that started in the measured slots, and when each ended."""
    from graphsync.timestamps import epoch

    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        when = epoch(record["time"])
        if not first <= when < end + 30:
            continue
        message = record["message"]
        if re.match(r"run [0-9a-f]{12} of .* objects, \d+ changes in", message) and when < end:
            result.runs += 1
            result.finishes.append(when)
        elif " skipped: " in message and when < end:
            result.skipped += 1
        elif " busy: " in message and when < end:
            result.busy += 1


# -- report --------------------------------------------------------------------------------------------------


def report(syncs: list[SyncResult], fleet: FleetResult | None, context: dict[str, str]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160), highlight=False, soft_wrap=True)
    console.print("[bold]graphsync fleet benchmark[/bold]")
    for key, value in context.items():
        console.print(f"  {key}: {value}", markup=False)
    table = Table(title="graphsync sync over many tenants", box=box.MARKDOWN, title_justify="left")
    for heading in ("tenants", "parallel", "wall s", "serial sum s", "wall / serial", "vs --parallel 1", "Graph req"):
        table.add_column(heading, justify="right")
    by_size: dict[int, dict[str, SyncResult]] = {}
    for result in syncs:
        by_size.setdefault(result.tenants, {})[result.parallel] = result
    for size, results in by_size.items():
        serial_run = results.get("1")
        for result in results.values():
            versus = f"{result.wall_seconds / serial_run.wall_seconds:.0%}" if serial_run else "-"
            table.add_row(
                str(size),
                result.parallel,
                f"{result.wall_seconds:.1f}",
                f"{result.serial_seconds:.1f}",
                f"{result.share_of_serial:.0%}",
                versus,
                str(result.graph_requests),
            )
    console.print(table)
    if fleet is None:
        return
    table = Table(
        title=f"graphsync run: {len(fleet.replicas)} replicas, {fleet.tenants} tenants, every {fleet.every} s, "
        f"{len(fleet.slots)} slots measured, output to a {fleet.output}",
        box=box.MARKDOWN,
        title_justify="left",
    )
    for heading in (
        "replica",
        "runs",
        "skipped",
        "busy",
        "storage calls",
        "calls / run",
        "CPU s",
        "CPU ms / run",
        "peak RSS MiB",
        "threads",
    ):
        table.add_column(heading, justify="right")
    for r in fleet.replicas:
        table.add_row(
            r.name,
            str(r.runs),
            str(r.skipped),
            str(r.busy),
            str(r.storage_calls),
            f"{r.storage_calls / r.runs:.1f}" if r.runs else "-",
            f"{r.cpu_seconds:.1f}",
            f"{1000 * r.cpu_seconds / r.runs:.0f}" if r.runs else "-",
            f"{r.peak_rss_mib:.1f}",
            str(r.max_threads),
        )
    calls = sum(r.storage_calls for r in fleet.replicas)
    console.print(table)
    console.print(
        f"runs per replica max/mean {fleet.max_over_mean:.2f}; slot drain "
        + ", ".join(f"{d:.1f} s" for d in fleet.drain_seconds)
        + f"; fleet storage calls per run {calls / max(fleet.runs, 1):.1f} (all replicas' calls, tries that skipped "
        f"or found the job busy included, over the runs); runs {fleet.runs} of {fleet.tenants * len(fleet.slots)} "
        "pair-slots",
        markup=False,
    )
    console.print(
        "Storage calls and CPU are counted over the measured slots only, for everything the replica did in them "
        "(runs, tries that skipped or found the job busy, token cache, lease renewals, its scheduler).",
        markup=False,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--sizes", type=positive_int_list("50,200"), default=[50, 200], help="tenants per sync")
    parser.add_argument("--graph-latency", type=float, default=0.3)
    parser.add_argument("--entra-latency", type=float, default=0.15)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--fleet-tenants", type=int, default=200)
    parser.add_argument("--every", type=int, default=30, help="the fleet job's interval in seconds")
    parser.add_argument("--slots", type=int, default=4, help="slots measured after the first")
    parser.add_argument(
        "--fleet-output",
        choices=["container", "directory"],
        default="container",
        help="the fleet's output: a blob container (default; its calls are counted too) or a shared directory",
    )
    parser.add_argument("--skip-serial", action="store_true", help="do not run sync --parallel 1")
    parser.add_argument("--skip-sync", action="store_true", help="measure the fleet only")
    parser.add_argument("--timeout", type=float, default=900.0)
    add_json_option(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from graphsync import __version__
    from graphsync.config import RunSettings
    from tests.fakes.azurite import azurite_version
    from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
    from tests.fakes.graph import FakeGraph, populate

    args.default_concurrency = RunSettings().concurrency
    started = time.monotonic()
    syncs: list[SyncResult] = []
    fleet: FleetResult | None = None
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        try:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphsync-bench-fleet-")))
            ca, ca_bundle = write_test_ca(workdir)
            azurite = start_azurite(stack, workdir)
            entra = stack.enter_context(FakeEntra(ca, client_id=CLIENT_ID, client_secret=CLIENT_SECRET))
            graph = stack.enter_context(FakeGraph(ca, entra))
            graph.latency_seconds = args.graph_latency
            entra.latency_seconds = args.entra_latency
            most = max([*args.sizes, args.fleet_tenants])
            names = [f"tenant{index:04d}.onmicrosoft.com" for index in range(most)]
            for seed, tenant in enumerate(names):
                populate(graph, tenant, USERS_PER_TENANT, 0, seed=seed)
            bench = Bench(args, workdir, ca_bundle, azurite, entra, graph)
            for size in [] if args.skip_sync else args.sizes:
                for parallel in (None,) if args.skip_serial else (None, 1):
                    print(f"sync over {size} tenants, parallel {parallel or 'default'} ...", file=sys.stderr)
                    syncs.append(bench.sync(names[:size], parallel))
            if args.replicas:
                print(f"fleet: {args.replicas} replicas x {args.fleet_tenants} tenants ...", file=sys.stderr)
                fleet = bench.fleet(names[: args.fleet_tenants])
        except (BenchFailure, RuntimeError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    context = {
        "command": command_line(argv),
        "latency": f"Graph {args.graph_latency} s per request, identity provider {args.entra_latency} s per token",
        "versions": f"graphsync {__version__}, Python {platform.python_version()}, "
        f"azure-storage-blob {package_version('azure-storage-blob')}, Azurite {azurite_version()}",
        "machine": machine_line(load_before),
        "run": run_line(started),
    }
    report(syncs, fleet, context)
    if args.json:
        dump_json(
            args.json,
            {
                "context": context,
                "sync": [vars(s) | {"share_of_serial": s.share_of_serial} for s in syncs],
                "fleet": None
                if fleet is None
                else {
                    "tenants": fleet.tenants,
                    "every": fleet.every,
                    "drain_seconds": fleet.drain_seconds,
                    "max_over_mean": fleet.max_over_mean,
                    "replicas": [vars(r) | {"finishes": len(r.finishes)} for r in fleet.replicas],
                },
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
