"""Benchmark: how fresh the export is with change notifications against polling, and what each costs when idle.

Against the local fakes (Graph with subscriptions, Entra, Azurite), one ``graphsync run`` replica, one delta
``users`` job per tenant:

* **latency, measured** -- ``--changes`` (20) user changes in one tenant (``--users`` 200), each at a random time,
  and the time until the snapshot (a local directory, polled every 50 ms) holds it: with ``[notifications]`` and
  ``every = "15m"`` (changes 1-4 s apart; no slot falls in the run, so notifications start every round), and
  polling with ``every = "1m"`` (changes at uniformly random times over ``--poll-minutes`` (2) minutes).
* **latency, computed** for polling with ``every = "15m"``, which would take hours to measure: a change at a
  uniformly random time is exported by the first round that starts after it, plus that round's duration.
  Rounds start at each slot plus the pair's jitter in that slot (``graphsync.schedule.slot_jitter``: 0 to 10 % of
  the interval, at most 30 s, a hash of the pair and the slot). 20,000 change times drawn over 200 slots give
  the distribution; the round duration is the median of the measured 1-minute run's rounds with changes. So the
  mean is about half the interval plus the mean jitter plus a round. The same model for ``every = "1m"`` is shown
  beside its measurement as a check.
* **requests per hour for 100 idle tenants** (``--tenants``) -- one replica with ``every = "1m"``,
  ``[notifications] check_every = "1m"`` and the output in a blob container, measured over ``--idle-slots`` (3)
  whole slots once the first runs and subscriptions are done: Graph requests from the fake Graph's request log,
  storage requests from the counting relay in front of Azurite (``tests/fakes/storage_relay.py``), split into
  rounds (everything but subscription upkeep) and subscription upkeep (``subscriptions/`` and its lease;
  ``/subscriptions`` on Graph). An hour is scaled from that window: polling at ``every = I`` costs 3600 / I
  rounds per tenant per hour at the measured per-round cost; notifications add the upkeep, measured per check and
  scaled to the default ``check_every`` (5 minutes), plus one renewal (PATCH) per subscription every 26 days
  (lifetime 29 d, renewed 3 d ahead), amortised.

Run from the repository root: ``.venv/bin/python bench/freshness.py``. Needs the test extras and Azurite, like the
tests. About 9 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
    run_line,
    start_azurite,
    stderr_tail,
    write_test_ca,
)
from fleet import Bench

from tests.fakes.azurite import free_port
from tests.fakes.storage_relay import StorageRelay

TENANT = "contoso.onmicrosoft.com"
CHECK_EVERY_DEFAULT = 300  # [notifications] check_every's default, in seconds
RENEWAL_PERIOD_HOURS = 26 * 24  # lifetime 29 days, renewed 3 days ahead
ROUND_LINE = re.compile(r"run [0-9a-f]{12} of .*: (\d+) objects, (\d+) changes in ([\d.]+) s")


@dataclass
class Latency:
    mode: str
    how: str  # "measured" or "computed"
    seconds: list[float]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class IdleCost:
    tenants: int
    seconds: float  # the measured window
    rounds: int
    round_graph: int  # requests of rounds in the window
    round_storage: int
    checks: int  # tenant maintenance checks in the window
    upkeep_graph: int
    upkeep_storage: int

    def per_hour(self, every: float, notifications: bool) -> tuple[float, float]:
        """Graph and storage requests per hour for the tenants, polling every ``every`` s (plus upkeep)."""
        rounds = self.tenants * 3600 / every
        graph = rounds * self.round_graph / self.rounds
        storage = rounds * self.round_storage / self.rounds
        if notifications:
            checks = self.tenants * 3600 / CHECK_EVERY_DEFAULT
            graph += self.tenants / RENEWAL_PERIOD_HOURS + checks * self.upkeep_graph / self.checks
            storage += checks * self.upkeep_storage / self.checks
        return graph, storage


class Freshness:
    """Runs ``graphsync run`` on configurations made by :class:`fleet.Bench` (fresh containers and output)."""

    def __init__(self, bench: Bench, args: argparse.Namespace) -> None:
        self.bench, self.args, self.graph = bench, args, bench.graph
        self.round_seconds = float("nan")  # the median round with changes of the last latency run

    @contextlib.contextmanager
    def replica(
        self, tenants: list[str], label: str, every: str, notifications: dict[str, Any] | None, *, blob: bool = False
    ) -> Any:
        """One ``graphsync run`` (storage through a counting relay), stopped on exit; yields (relay, log, output):
        the output directory, or with ``blob`` a container (whose requests the relay counts too)."""
        config = self.bench.config(tenants, label, every=every, blob_output=blob)
        with StorageRelay(self.bench.azurite) as relay:
            text = config.read_text().replace(self.bench.azurite.connection_string, relay.connection_string)
            if notifications is not None:
                port = free_port()
                settings = {"notification_url": f"http://127.0.0.1:{port}/graph/notifications", "port": port}
                settings |= {"host": "127.0.0.1"} | notifications
                text += "\n[notifications]\n" + "".join(f"{key} = {json.dumps(v)}\n" for key, v in settings.items())
            config.write_text(text)
            log = self.bench.workdir / f"{label}.log"
            env = self.bench.env | {"XDG_CACHE_HOME": str(self.bench.workdir / f"{label}-cache")}
            with log.open("w") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "graphsync", "run", "--config", str(config)],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                yield relay, log, self.bench.workdir / f"{label}-out"
                if process.poll() is not None:
                    raise BenchFailure(f"{label}: graphsync run exited {process.returncode}\n{stderr_tail(log)}")
            finally:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()

    def latency(self, mode: str, every: str, notifications: bool, spacing: tuple[float, float]) -> Latency:
        """Change users one at a time at random moments (``spacing`` apart) and time each until it is exported."""
        ids = sorted(self.graph.objects(TENANT, "users"))
        rng = random.Random(16)
        with self.replica([TENANT], mode, every, {} if notifications else None) as (_, log, output):
            snapshot = output / TENANT / "users" / "snapshot.jsonl"
            _wait(lambda: snapshot.exists(), 60, f"{mode}: the first round")
            if notifications:
                _wait(lambda: self.graph.subscriptions.active(), 60, f"{mode}: the subscription")
            time.sleep(6)  # the first run after start is over
            pending: dict[str, tuple[str, float]] = {}
            exported: list[float] = []
            due = time.time()
            for n, uid in enumerate(rng.sample(ids, self.args.changes)):
                due += rng.uniform(*spacing)
                while time.time() < due:
                    _collect(snapshot, pending, exported)
                    time.sleep(0.05)
                self.graph.update(TENANT, "users", uid, displayName=f"{mode} {n}")
                pending[uid] = (f"{mode} {n}", time.time())
            deadline = time.time() + 120 + spacing[1]
            while pending and time.time() < deadline:
                _collect(snapshot, pending, exported)
                time.sleep(0.05)
            if pending:
                raise BenchFailure(f"{mode}: {len(pending)} changes not exported in time\n{stderr_tail(log)}")
            self.round_seconds = statistics.median(_round_seconds(log, changed=True) or [float("nan")])
        return Latency(mode, "measured", exported)

    def idle(self, tenants: list[str]) -> IdleCost:
        """Requests of idle tenants over whole slots, rounds and subscription upkeep apart."""
        every, subscribed = 60, len(self.graph.subscriptions.active())  # the latency run's is still there
        with self.replica(tenants, "idle", f"{every}s", {"check_every": "1m"}, blob=True) as (relay, log, _):
            _wait(lambda: len(_round_seconds(log)) >= len(tenants), 300, "the first rounds")
            _wait(
                lambda: len(self.graph.subscriptions.active()) == subscribed + len(tenants), 300, "every subscription"
            )
            start = (int(time.time()) // every + 1) * every
            time.sleep(max(0.0, start - time.time()))
            graph_at, storage_at, rounds_at = len(self.graph.requests), len(relay.records()), len(_round_seconds(log))
            time.sleep(self.args.idle_slots * every)
            graph = self.graph.requests[graph_at:]
            storage = relay.records()[storage_at:]
            rounds = len(_round_seconds(log)) - rounds_at
        upkeep_graph = sum(1 for r in graph if "/subscriptions" in r.path)
        upkeep_storage = sum(1 for r in storage if "/subscriptions/" in r.blob or "_subscriptions.lock" in r.blob)
        return IdleCost(
            len(tenants),
            self.args.idle_slots * every,
            rounds,
            len(graph) - upkeep_graph,
            len(storage) - upkeep_storage,
            len(tenants) * self.args.idle_slots,
            upkeep_graph,
            upkeep_storage,
        )


def modelled(every: str, round_seconds: float, samples: int = 20_000) -> Latency:
    """Polling latency from the schedule itself: see the module docstring."""
    from graphsync.config import JobSettings
    from graphsync.schedule import slot_jitter

    job = JobSettings(name="users", resource="users", delta=True, every=every)
    interval = job.interval_seconds or 0
    pair, rng, base = f"{TENANT}/users", random.Random(15), 1_800_000_000 // interval * interval
    latencies = []
    for _ in range(samples):
        changed = base + rng.uniform(0, 200 * interval)
        slot = changed // interval * interval
        start = slot + slot_jitter(job, pair, slot)
        if start < changed:
            start = slot + interval + slot_jitter(job, pair, slot + interval)
        latencies.append(start - changed + round_seconds)
    return Latency(f"polling, every = {every!r}", "computed", latencies)


def _collect(snapshot: Path, pending: dict[str, tuple[str, float]], exported: list[float]) -> None:
    """Move changes the snapshot now holds from ``pending`` to ``exported`` (their latency)."""
    if not pending:
        return
    seen = time.time()
    try:
        names = {r["id"]: r.get("displayName") for r in map(json.loads, snapshot.read_text().splitlines())}
    except (OSError, json.JSONDecodeError):
        return  # being replaced: look again
    for uid, (name, changed) in list(pending.items()):
        if names.get(uid) == name:
            exported.append(seen - changed)
            del pending[uid]


def _round_seconds(log: Path, *, changed: bool = False) -> list[float]:
    """Durations of the rounds in the replica's log (with ``changed``: only those that found changes)."""
    durations = []
    for line in log.read_text().splitlines():
        match = ROUND_LINE.search(json.loads(line)["message"]) if line.startswith("{") else None
        if match and (not changed or int(match[2]) > 0):
            durations.append(float(match[3]))
    return durations


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchFailure(f"timed out waiting for {what}")
        time.sleep(0.1)


def report(latencies: list[Latency], idle: IdleCost, context: dict[str, str]) -> list[dict[str, Any]]:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140), highlight=False, soft_wrap=True)
    console.print("[bold]graphsync freshness benchmark[/bold]")
    for key, value in context.items():
        console.print(f"  {key}: {value}", markup=False)
    table = Table(title="change-to-export latency and idle cost", box=box.MARKDOWN, title_justify="left")
    columns = ("mode", "latency", "changes", "p50 s", "p95 s", "Graph req/h", "storage req/h", "requests")
    for heading in columns:
        table.add_column(heading, justify="left" if heading in ("mode", "latency", "requests") else "right")
    rows = []
    for latency in latencies:
        notifications = latency.mode.startswith("notifications")
        every = 900 if "15m" in latency.mode else 60
        graph, storage = idle.per_hour(every, notifications)
        how = "measured (scaled from the window)" if every == 60 and not notifications else "computed from unit costs"
        rows.append(
            {
                "mode": latency.mode,
                "latency": latency.how,
                "changes": len(latency.seconds),
                "p50_seconds": latency.quantile(0.5),
                "p95_seconds": latency.quantile(0.95),
                "graph_per_hour": graph,
                "storage_per_hour": storage,
                "requests": how,
            }
        )
        row = rows[-1]
        table.add_row(
            latency.mode,
            latency.how,
            str(row["changes"]),
            f"{row['p50_seconds']:.1f}",
            f"{row['p95_seconds']:.1f}",
            f"{graph:,.0f}",
            f"{storage:,.0f}",
            how,
        )
    console.print(table)
    console.print(
        f"Idle window: {idle.tenants} tenants, {idle.seconds:.0f} s, {idle.rounds} rounds: "
        f"{idle.round_graph / max(idle.rounds, 1):.2f} Graph and {idle.round_storage / max(idle.rounds, 1):.2f} "
        f"storage requests per round; subscription upkeep {idle.upkeep_storage / idle.checks:.2f} storage and "
        f"{idle.upkeep_graph / idle.checks:.3f} Graph requests per tenant check (one replica; each further replica "
        "adds one record read per tenant per check).",
        markup=False,
    )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--changes", type=int, default=20, help="changes timed per measured mode")
    parser.add_argument("--users", type=int, default=200, help="users of the tenant whose changes are timed")
    parser.add_argument("--poll-minutes", type=float, default=2.0, help="how long changes are spread when polling")
    parser.add_argument("--tenants", type=int, default=100, help="idle tenants whose requests are counted")
    parser.add_argument("--idle-slots", type=int, default=3, help="whole 1-minute slots the idle cost is measured")
    add_json_option(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from graphsync import __version__
    from tests.fakes.azurite import azurite_version
    from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
    from tests.fakes.graph import FakeGraph, populate

    started, load_before = time.monotonic(), os.getloadavg()
    with contextlib.ExitStack() as stack:
        try:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphsync-bench-freshness-")))
            ca, ca_bundle = write_test_ca(workdir)
            azurite = start_azurite(stack, workdir)
            entra = stack.enter_context(FakeEntra(ca, client_id=CLIENT_ID, client_secret=CLIENT_SECRET))
            graph = stack.enter_context(FakeGraph(ca, entra))
            stack.callback(graph.subscriptions.close)
            populate(graph, TENANT, args.users, 0, seed=1)
            idle_tenants = [f"idle{index:04d}.onmicrosoft.com" for index in range(args.tenants)]
            for seed, tenant in enumerate(idle_tenants):
                populate(graph, tenant, 20, 0, seed=seed + 2)
            run = Freshness(Bench(args, workdir, ca_bundle, azurite, entra, graph), args)
            print("latency with notifications ...", file=sys.stderr)
            pushed = run.latency("notifications, every = '15m'", "15m", True, (1.0, 4.0))
            print("latency polling every minute ...", file=sys.stderr)
            spread = args.poll_minutes * 60 / args.changes
            polled = run.latency("polling, every = '1m'", "1m", False, (0.0, 2 * spread))
            round_seconds = run.round_seconds
            print(f"requests of {args.tenants} idle tenants ...", file=sys.stderr)
            idle = run.idle(idle_tenants)
        except (BenchFailure, RuntimeError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    latencies = [pushed, polled, modelled("1m", round_seconds), modelled("15m", round_seconds)]
    context = {
        "command": command_line(argv),
        "round": f"median measured round with changes {round_seconds:.2f} s (used by the computed rows)",
        "versions": f"graphsync {__version__}, Python {platform.python_version()}, "
        f"azure-storage-blob {package_version('azure-storage-blob')}, Azurite {azurite_version()}",
        "machine": machine_line(load_before),
        "run": run_line(started),
    }
    rows = report(latencies, idle, context)
    if args.json:
        dump_json(args.json, {"context": context, "rows": rows, "idle": vars(idle)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
