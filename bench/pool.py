"""Benchmark: what choosing the next try costs the run pool, with thousands of tries pending.

For each size in ``--pending`` (default 1,000 and 10,000): a replica's :class:`graphsync.affinity.Affinity` that has
learned the last runner of every pair (three replicas, 50 jobs over ``size / 50`` tenants), a pool with one worker,
and ``size`` pending tries of those pairs that come due an hour from now; then ``--picks`` (1,000) tries of further
pairs that are due at once. The worker takes the due ones one by one (each pick is one pass over whatever the pool
keeps), the run is a no-op. Reported: CPU per ``put`` while queueing the pending tries, CPU per pick (queueing the
due try included), and how many times the pool asked the delay (affinity) per put and per pick. Process CPU time:
the main thread only waits meanwhile.

``--source DIR`` times the ``graphsync`` package in ``DIR`` instead of the installed one (``git archive main | tar
-x -C /tmp/main``, then ``--source /tmp/main/daemon``): the pool before this change took the delay as one callable
asked for every pending try on every pass. Figures are printed, never asserted.

    .venv/bin/python bench/pool.py                  # --pending 1000,10000 --picks 1000 --source DIR --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    add_json_option,
    bench_parser,
    command_line,
    dump_json,
    machine_line,
    positive_int_list,
    run_line,
)

JOBS = 50
REPLICAS = ("replica-a", "replica-b", "replica-c")


class Counted:
    """The affinity as the pool sees it, counting the pool's questions; for both the old and the new interface."""

    def __init__(self, affinity: Any) -> None:
        self.affinity = affinity
        self.asked = 0

    def __call__(self, attempt: Any, in_flight: int) -> float:  # the old interface: one callable per try and pass
        self.asked += 1
        delay: float = self.affinity.delay(attempt, in_flight)
        return delay

    def of(self, attempt: Any) -> Any:
        self.asked += 1
        return self.affinity.of(attempt)

    def load(self, in_flight: int) -> float:
        self.asked += 1
        load: float = self.affinity.load(in_flight)
        return load


def measure(pending: int, picks: int) -> dict[str, Any]:
    from graphsync.affinity import Affinity
    from graphsync.config import JobSettings
    from graphsync.pool import RunPool, Try

    jobs = [JobSettings(name=f"job{index:02d}", resource="users", every="15m") for index in range(JOBS)]
    tenants = [f"tenant{index:05d}" for index in range(pending // JOBS + picks)]
    affinity = Affinity(REPLICAS[0])
    for job in jobs:
        for index, tenant in enumerate(tenants):
            affinity.learn(job.name, tenant, REPLICAS[index % len(REPLICAS)])
    counted = Counted(affinity)
    done = threading.Event()
    taken: list[Any] = []

    def run(attempt: Any) -> None:
        taken.append(attempt)
        if len(taken) == picks:
            done.set()

    stop = threading.Event()
    pool = RunPool(run, concurrency=1, per_tenant=2, stop=stop, delay=counted)
    later = time.time() + 3600
    queueing = time.process_time()
    for index in range(pending):
        pool.put(Try(jobs[index % JOBS], tenants[index // JOBS], not_before=later))
    put_cpu = time.process_time() - queueing
    asked_by_puts = counted.asked
    due = [Try(jobs[0], tenants[pending // JOBS + index], not_before=0.0) for index in range(picks)]
    choosing = time.process_time()
    for attempt in due:
        pool.put(attempt)
    pool.start()
    if not done.wait(timeout=600):
        raise RuntimeError(f"only {len(taken)} of {picks} due tries were taken in 10 minutes")
    pick_cpu = time.process_time() - choosing
    stop.set()
    pool.wake()
    pool.join(timeout=5)
    return {
        "pending": pending,
        "put_us": put_cpu / pending * 1e6,
        "pick_us": pick_cpu / picks * 1e6,
        "asked_per_put": asked_by_puts / pending,
        "asked_per_pick": (counted.asked - asked_by_puts) / picks,
    }


def report(rows: list[dict[str, Any]], context: dict[str, str]) -> None:
    for key, value in context.items():
        print(f"{key}: {value}")
    print()
    print("| pending tries | CPU per put µs | CPU per pick µs | delay asked per put | delay asked per pick |")
    print("|--------------:|---------------:|----------------:|--------------------:|---------------------:|")
    for row in rows:
        print(
            f"| {row['pending']:13,} | {row['put_us']:14.1f} | {row['pick_us']:15.1f} "
            f"| {row['asked_per_put']:19.2f} | {row['asked_per_pick']:20.1f} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--pending", type=positive_int_list("1000,10000"), default=[1000, 10000], help="pending tries")
    parser.add_argument("--picks", type=int, default=1000, help="due tries taken (and timed) per size")
    parser.add_argument("--source", type=Path, help="directory holding the graphsync package to time")
    add_json_option(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.source is not None:
        sys.path.insert(0, str(args.source.resolve()))
    import graphsync.pool

    started = time.monotonic()
    load_before = os.getloadavg()
    rows = [measure(pending, args.picks) for pending in args.pending]
    context = {
        "command": command_line(argv),
        "graphsync": str(Path(graphsync.pool.__file__).parent),
        "machine": machine_line(load_before),
        "run": run_line(started),
    }
    report(rows, context)
    if args.json:
        dump_json(args.json, {"context": context, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
