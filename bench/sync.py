"""Benchmark: a full delta sync of N users from the local fake Graph, graphsync against a bare requests + json loop.

For each size N (default 10,000 and 100,000) it runs, one after the other, against the same fake Graph
(``page_size`` 999, N users made by ``tests.fakes.graph.populate``, one tenant per size):

* **baseline** — a child process with a plain ``requests.Session``: GET the delta URL with a bearer token,
  ``.json()`` each page, count and discard its objects, follow ``@odata.nextLink`` until the ``@odata.deltaLink``;
* **graphsync** — a child process running ``python -m graphsync sync --config <toml>``: the real command, with the
  token from the fake Entra through the shared token cache on Azurite, the job lock lease on Azurite, the SQLite
  working store, the change file and ``snapshot.jsonl`` published to a local directory.

Each child is started through a small wrapper process (``MEASURE``) that spawns it and reaps it with
``os.wait4``, so its peak RSS is that process's own ``ru_maxrss``: Linux carries the RSS high-water mark of the
process that called ``exec`` into the new program's ``ru_maxrss``, so a child spawned straight from this parent
(which holds the fake directory, hundreds of MiB at 100k users) would report the parent's size instead of its own.

Throughput is given twice, both measured from outside the child: end to end (spawn to exit: interpreter start,
imports, token and lock included, what ``graphsync sync`` costs an operator) and from the first Graph request to
exit (the paging phase, which is what grows with N). The snapshot must have exactly N lines, or the run fails.
Each graphsync run has a fresh working store of its own (``[output] work_directory`` in the bench's temporary
directory): its size on disk is reported, and no other run or process shares it.

``--latency SECONDS`` makes the fake Graph wait that long before answering each request, as a distant Graph does
(0.3-1 s a page): a full round then costs at least the sum of its pages' latencies, and the report compares the
paging phase with that sum (graphsync fetches the next page while it applies the current one).

Run from the repository root: ``.venv/bin/python bench/sync.py`` (``--sizes 10000,100000``; ``--sizes 1000000
--repeat 1`` for a million users, about 1 GiB in the fake Graph and a few minutes; ``--latency 0.3``). Needs the
test extras (trustme, pytest) and Azurite (``npm ci``), like the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    BenchFailure,
    add_json_option,
    bench_parser,
    command_line,
    dump_json,
    package_version,
    positive_int_list,
    run_line,
    start_azurite,
    stderr_tail,
    write_test_ca,
)

PAGE_SIZE = 999  # the largest page Graph serves for directory objects
SELECT = ["displayName", "givenName", "surname", "mail", "userPrincipalName", "jobTitle"]
JOB = "users"
MODES = ("graphsync", "baseline")
TOKEN_VARIABLE = "BENCH_SYNC_ACCESS_TOKEN"  # hands the baseline its token (not GRAPHSYNC_*: the config rejects those)
FLAT_LIMIT = 1.25  # peak RSS at the largest size over the smallest; above this, memory is not flat


# -- the measuring wrapper (runs as its own small process) ---------------------------------------------------

# Run as ``python -I -S -c MEASURE RESULT COMMAND...``: spawn COMMAND, reap it with wait4 and write that process's
# own rusage to RESULT as JSON. Inline and importing almost nothing, so the wrapper stays at the bare interpreter's
# size: its RSS high-water mark is the floor of what the spawned program's ru_maxrss can report (Linux carries the
# exec caller's mark into it). The parent stops a hung run by signalling the wrapper's process group.
MEASURE = """\
import json, os, signal, sys, time
result, command = sys.argv[1], sys.argv[2:]
started = time.time()
pid = os.posix_spawn(command[0], command, os.environ)
def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGTERM, forward)
_, status, usage = os.wait4(pid, 0)
ended = time.time()
with open(result, "w") as file:
    json.dump({"exit_code": os.waitstatus_to_exitcode(status), "started": started, "ended": ended,
               "maxrss_kib": usage.ru_maxrss, "user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime},
              file)
"""


# -- the baseline child ----------------------------------------------------------------------------------------


def _baseline_main(url: str) -> int:
    """A bare requests + json loop over the delta round: what fetching and parsing the pages alone costs."""
    import requests

    token = os.environ.pop(TOKEN_VARIABLE)
    session = requests.Session()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    objects = pages = 0
    next_url: str | None = url
    delta_link = None
    while next_url is not None:
        response = session.get(next_url, headers=headers, timeout=60)
        response.raise_for_status()
        body = response.json()
        objects += len(body["value"])
        pages += 1
        next_url = body.get("@odata.nextLink")
        delta_link = body.get("@odata.deltaLink")
    print(json.dumps({"objects": objects, "pages": pages, "delta_link": delta_link is not None}), flush=True)
    return 0


# -- results -----------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One child run, as the wrapper and the fake Graph saw it."""

    mode: str  # graphsync | baseline
    size: int
    repeat: int  # 1-based; 0 for a summary of several repeats
    wall_seconds: float  # spawn to exit
    phase_seconds: float  # first Graph request to exit
    startup_seconds: float  # spawn to first Graph request
    pages: int
    graph_errors: int
    peak_rss_kib: int
    cpu_seconds: float
    store_bytes: int = 0  # graphsync: the working store's size on disk after the run

    @property
    def objects_per_second(self) -> float:
        return self.size / self.wall_seconds

    @property
    def phase_objects_per_second(self) -> float:
        return self.size / self.phase_seconds

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_kib / 1024

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "objects_per_second": self.objects_per_second,
            "phase_objects_per_second": self.phase_objects_per_second,
            "peak_rss_mib": self.peak_rss_mib,
        }


def summarize(runs: list[Measurement]) -> Measurement:
    """Several repeats as one: the median of each time, the highest peak RSS (what must stay flat)."""
    first = runs[0]
    return Measurement(
        mode=first.mode,
        size=first.size,
        repeat=0,
        wall_seconds=statistics.median(r.wall_seconds for r in runs),
        phase_seconds=statistics.median(r.phase_seconds for r in runs),
        startup_seconds=statistics.median(r.startup_seconds for r in runs),
        pages=first.pages,
        graph_errors=sum(r.graph_errors for r in runs),
        peak_rss_kib=max(r.peak_rss_kib for r in runs),
        cpu_seconds=statistics.median(r.cpu_seconds for r in runs),
        store_bytes=max(r.store_bytes for r in runs),
    )


def tenant_for(size: int) -> str:
    """One tenant per size, so each delta round sees exactly N users."""
    return f"bench-{size}.onmicrosoft.com"


# -- orchestration -----------------------------------------------------------------------------------------


class Bench:
    def __init__(
        self, args: argparse.Namespace, workdir: Path, ca_bundle: Path, azurite: Any, entra: Any, graph: Any
    ) -> None:
        self.args = args
        self.workdir = workdir
        self.ca_bundle = ca_bundle
        self.azurite = azurite
        self.entra = entra
        self.graph = graph
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("GRAPHSYNC_")}
        self.env |= {"REQUESTS_CA_BUNDLE": str(ca_bundle)}
        self.commands: dict[str, list[str]] = {}

    def delta_url(self) -> str:
        """The URL graphsync itself starts a delta round of the job from."""
        from graphsync.graph import GraphClient

        # Only builds a URL, which needs no token: no TokenSource is worth faking for it.
        client = GraphClient(self.graph.base_url, "v1.0", tokens=None)  # type: ignore[arg-type]
        return client.collection_url(JOB, select=SELECT, delta=True)

    def interpreter_floor(self) -> Measurement:
        """``python -c pass`` through the wrapper: the smallest peak RSS the method can report."""
        run = self._run("floor", 0, 0, [sys.executable, "-c", "pass"], self.env)
        return Measurement(
            "floor",
            0,
            0,
            run["ended"] - run["started"],
            0.0,
            0.0,
            0,
            0,
            run["maxrss_kib"],
            run["user_seconds"] + run["system_seconds"],
        )

    def baseline(self, size: int, repeat: int) -> Measurement:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "baseline", "--url", self.delta_url()]
        self.commands["baseline"] = command
        env = self.env | {TOKEN_VARIABLE: self._token(tenant_for(size))}
        self.graph.reset_records()
        run = self._run("baseline", size, repeat, command, env)
        stdout = (self.workdir / f"baseline-{size}-{repeat}.stdout").read_text()
        try:
            report = json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise self._failure("baseline", size, repeat, f"printed no summary (stdout: {stdout[-300:]!r})") from None
        if report["objects"] != size or not report["delta_link"]:
            raise self._failure(
                "baseline",
                size,
                repeat,
                f"got {report['objects']} objects (expected {size}), "
                f"delta link {'present' if report['delta_link'] else 'missing'}",
            )
        return self._measurement("baseline", size, repeat, run)

    def graphsync(self, size: int, repeat: int) -> Measurement:
        """A full sync: a fresh output directory, working store and container each time, so there is no delta link
        to resume and no store to start from. Both are deleted once measured (a million users take ~1 GiB)."""
        output, work = self.workdir / f"out-{size}-{repeat}", self.workdir / f"work-{size}-{repeat}"
        config = self._write_config(size, repeat, output, work)
        command = [sys.executable, "-m", "graphsync", "sync", "--config", str(config)]
        self.commands["graphsync"] = command
        self.graph.reset_records()
        run = self._run("graphsync", size, repeat, command, self.env)
        self._check_output(size, repeat, output)
        measurement = self._measurement("graphsync", size, repeat, run)
        measurement.store_bytes = sum(path.stat().st_size for path in work.rglob("store.sqlite*"))
        shutil.rmtree(output)
        shutil.rmtree(work)
        return measurement

    def _token(self, tenant: str) -> str:
        import requests

        from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET

        response = requests.post(
            f"{self.entra.authority_host}/{tenant}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "scope": "https://graph.microsoft.com/.default",
            },
            verify=str(self.ca_bundle),
            timeout=30,
        )
        if response.status_code != 200:
            raise BenchFailure(f"the fake Entra refused a token for {tenant}: {response.status_code} {response.text}")
        return response.json()["access_token"]

    def _write_config(self, size: int, repeat: int, output: Path, work: Path) -> Path:
        from azure.storage.blob import BlobServiceClient

        from tests.conftest import dumps_toml
        from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET

        container = f"bench-sync-{size}-{uuid.uuid4().hex[:8]}"
        with BlobServiceClient.from_connection_string(self.azurite.connection_string) as service:
            service.create_container(container)
        path = self.workdir / f"graphsync-{size}-{repeat}.toml"
        path.write_text(
            dumps_toml(
                {
                    "log_level": "INFO",
                    "identity": {
                        "client_id": CLIENT_ID,
                        "tenants": [tenant_for(size)],
                        "authority_host": self.entra.authority_host,
                        "client_secret": CLIENT_SECRET,
                    },
                    "storage": {"connection_string": self.azurite.connection_string, "container": container},
                    "graph": {"endpoint": self.graph.base_url},
                    "output": {"directory": str(output), "work_directory": str(work)},
                    "jobs": [{"name": JOB, "resource": "users", "delta": True, "select": SELECT, "every": "1h"}],
                }
            )
        )
        return path

    def _check_output(self, size: int, repeat: int, output: Path) -> None:
        """Fail unless the run published exactly ``size`` snapshot lines and saved a delta link."""
        directory = output / tenant_for(size) / JOB
        snapshot = directory / "snapshot.jsonl"
        if not snapshot.is_file():
            raise self._failure("graphsync", size, repeat, f"published no {snapshot}")
        with snapshot.open("rb") as file:
            lines = sum(1 for _ in file)
        if lines != size:
            raise self._failure("graphsync", size, repeat, f"{snapshot} has {lines} lines, expected {size}")
        state = json.loads((directory / "state.json").read_text())
        if state.get("objects") != size or not state.get("delta_link"):
            link = "present" if state.get("delta_link") else "missing"
            raise self._failure(
                "graphsync", size, repeat, f"state.json says objects={state.get('objects')}, delta_link {link}"
            )

    def _run(self, mode: str, size: int, repeat: int, command: list[str], env: dict[str, str]) -> dict[str, Any]:
        """Run ``command`` under the measuring wrapper; its stdout and stderr go to files in the workdir."""
        result = self.workdir / f"{mode}-{size}-{repeat}.rusage.json"
        wrapper = [sys.executable, "-I", "-S", "-c", MEASURE, str(result), *command]
        stdout_path, stderr_path = (self.workdir / f"{mode}-{size}-{repeat}.{name}" for name in ("stdout", "stderr"))
        with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                wrapper,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        timeout = self.args.timeout + 2 * math.ceil(size / PAGE_SIZE) * self.args.latency  # --timeout plus paging
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            raise self._failure(mode, size, repeat, f"did not finish within {timeout:g} s") from None
        except BaseException:  # Ctrl-C: the child is in its own session and did not get the SIGINT
            _stop_group(process)
            raise
        if process.returncode != 0 or not result.is_file():
            raise self._failure(mode, size, repeat, f"measuring wrapper exited with code {process.returncode}")
        run = json.loads(result.read_text())
        if run["exit_code"] != 0:
            raise self._failure(mode, size, repeat, f"exited with code {run['exit_code']}")
        return run

    def _measurement(self, mode: str, size: int, repeat: int, run: dict[str, Any]) -> Measurement:
        requests = self.graph.requests  # this child's only: reset before it started
        if not requests:
            raise self._failure(mode, size, repeat, "made no Graph requests")
        first = min(r.time for r in requests)
        return Measurement(
            mode=mode,
            size=size,
            repeat=repeat,
            wall_seconds=run["ended"] - run["started"],
            phase_seconds=run["ended"] - first,
            startup_seconds=first - run["started"],
            pages=sum(r.status == 200 for r in requests),
            graph_errors=sum(r.status != 200 for r in requests),
            peak_rss_kib=run["maxrss_kib"],
            cpu_seconds=run["user_seconds"] + run["system_seconds"],
        )

    def _failure(self, mode: str, size: int, repeat: int, why: str) -> BenchFailure:
        command = shlex.join(self.commands.get(mode, [mode]))
        tail = stderr_tail(self.workdir / f"{mode}-{size}-{repeat}.stderr")
        return BenchFailure(
            f"{mode} run {repeat} with {size} objects {why}\n  command: {command}\n  stderr tail:\n{tail or '(empty)'}"
        )


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """End the wrapper we started and the child it spawned (its own session), TERM first, then KILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# -- report ------------------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "-"


def _latency_table(args: argparse.Namespace, results: dict[int, dict[str, Measurement]]) -> Any:
    """A full round's paging phase against the sum of its pages' latencies: what Graph alone makes it cost."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"A full round with {args.latency:g} s of Graph latency a page, median of {args.repeat} (paging = the "
        "child's first Graph request to its exit, publication included; sum = answered pages x latency)",
        box=box.MARKDOWN,
        title_justify="left",
    )
    for heading in (
        "objects",
        "pages",
        "sum of latencies s",
        "graphsync s",
        "graphsync / sum",
        "baseline s",
        "baseline / sum",
    ):
        table.add_column(heading, justify="right", no_wrap=True)
    for size in args.sizes:
        g, b = results[size]["graphsync"], results[size]["baseline"]
        total = g.pages * args.latency
        table.add_row(
            f"{size:,}",
            str(g.pages),
            f"{total:.1f}",
            f"{g.phase_seconds:.1f}",
            _ratio(g.phase_seconds, total),
            f"{b.phase_seconds:.1f}",
            _ratio(b.phase_seconds, b.pages * args.latency),
        )
    return table


def report(
    args: argparse.Namespace,
    runs: dict[int, dict[str, list[Measurement]]],
    results: dict[int, dict[str, Measurement]],
    floor: Measurement,
    context: dict[str, str],
) -> list[str]:
    """Print the tables; return the notes about memory that is not flat (empty when it is)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 200), highlight=False, soft_wrap=True)
    console.print("[bold]graphsync sync benchmark[/bold]")
    for key, value in context.items():
        console.print(f"  {key}: {value}", markup=False)
    console.print()

    throughput = Table(
        title=f"Throughput, median of {args.repeat} (ratio = graphsync objects/s / baseline objects/s; "
        "paging = from the child's first Graph request to its exit)",
        box=box.MARKDOWN,
        title_justify="left",
    )
    for heading in (
        "objects",
        "pages",
        "graphsync obj/s",
        "baseline obj/s",
        "ratio",
        "graphsync paging obj/s",
        "baseline paging obj/s",
        "paging ratio",
    ):
        throughput.add_column(heading, justify="right", no_wrap=True)
    for size in args.sizes:
        g, b = results[size]["graphsync"], results[size]["baseline"]
        throughput.add_row(
            f"{size:,}",
            str(g.pages),
            f"{g.objects_per_second:,.0f}",
            f"{b.objects_per_second:,.0f}",
            _ratio(g.objects_per_second, b.objects_per_second),
            f"{g.phase_objects_per_second:,.0f}",
            f"{b.phase_objects_per_second:,.0f}",
            _ratio(g.phase_objects_per_second, b.phase_objects_per_second),
        )
    console.print(throughput)

    timing = Table(
        title=f"Child wall time, spawn to first Graph request (startup), and CPU (user + system), in "
        f"seconds, median of {args.repeat}",
        box=box.MARKDOWN,
        title_justify="left",
    )
    for heading in (
        "objects",
        "graphsync wall",
        "baseline wall",
        "graphsync startup",
        "baseline startup",
        "graphsync CPU",
        "baseline CPU",
    ):
        timing.add_column(heading, justify="right", no_wrap=True)
    for size in args.sizes:
        g, b = results[size]["graphsync"], results[size]["baseline"]
        timing.add_row(
            f"{size:,}",
            f"{g.wall_seconds:.2f}",
            f"{b.wall_seconds:.2f}",
            f"{g.startup_seconds:.2f}",
            f"{b.startup_seconds:.2f}",
            f"{g.cpu_seconds:.2f}",
            f"{b.cpu_seconds:.2f}",
        )
    console.print(timing)

    smallest = args.sizes[0]
    memory = Table(
        title=f"Peak RSS, highest of {args.repeat} (ru_maxrss of the child itself; vs {smallest:,} = this "
        f"size / {smallest:,} objects, flat means about 1.00x)",
        box=box.MARKDOWN,
        title_justify="left",
    )
    for heading in (
        "objects",
        "graphsync MiB",
        "baseline MiB",
        "graphsync / baseline",
        f"graphsync vs {smallest:,}",
        f"baseline vs {smallest:,}",
        "working store on disk MiB",
    ):
        memory.add_column(heading, justify="right", no_wrap=True)
    for size in args.sizes:
        g, b = results[size]["graphsync"], results[size]["baseline"]
        g0, b0 = results[smallest]["graphsync"], results[smallest]["baseline"]
        memory.add_row(
            f"{size:,}",
            f"{g.peak_rss_mib:.1f}",
            f"{b.peak_rss_mib:.1f}",
            _ratio(g.peak_rss_kib, b.peak_rss_kib),
            _ratio(g.peak_rss_kib, g0.peak_rss_kib),
            _ratio(b.peak_rss_kib, b0.peak_rss_kib),
            f"{g.store_bytes / 2**20:.1f}",
        )
    console.print(memory)
    if args.latency:
        console.print(_latency_table(args, results))

    largest = args.sizes[-1]
    problems = []
    summary = []
    for mode in ("graphsync", "baseline"):
        low, high = results[smallest][mode], results[largest][mode]
        ratio = high.peak_rss_kib / low.peak_rss_kib
        summary.append(f"{mode} {ratio:.2f}x ({low.peak_rss_mib:.1f} -> {high.peak_rss_mib:.1f} MiB)")
        if largest > smallest and ratio > FLAT_LIMIT:
            per_object = (high.peak_rss_kib - low.peak_rss_kib) * 1024 / (largest - smallest)
            problems.append(
                f"{mode} peak RSS grows with N: {ratio:.2f}x from {smallest:,} to {largest:,} objects, "
                f"about {per_object:,.0f} bytes per extra object (flat means under {FLAT_LIMIT:.2f}x)"
            )
    console.print(
        f"Peak RSS {largest:,} / {smallest:,} objects: "
        + "; ".join(summary)
        + (" — NOT FLAT" if problems else " — flat"),
        markup=False,
    )

    notes = [
        "graphsync = `python -m graphsync sync --config <toml>` (one job: users, delta = true, select "
        f"{','.join(SELECT)}; output directory; Azurite for the token cache and the job lock). baseline = "
        "requests.Session().get(...).json() over the same delta URL with a bearer token issued beforehand, "
        "objects counted and discarded.",
        "obj/s = objects / wall time from spawn to exit. paging obj/s = objects / (exit - the fake Graph's receipt "
        "of the child's first request): without interpreter start, imports, token and lock, with graphsync's "
        "snapshot publication and state write.",
        "Peak RSS is ru_maxrss from wait4 on the child, spawned by a small wrapper process so that the parent's "
        f"size does not leak into it (Linux carries the exec caller's high-water mark); `python -c pass` measured "
        f"this way peaks at {floor.peak_rss_mib:.1f} MiB.",
        "The fake Graph runs in this process (Python threads, TLS, one connection per request, HTTP/1.0) and "
        "serves both clients the same way, so it bounds both rates; compare ratios, and numbers from the same run.",
        "Every graphsync run was checked: exit 0, snapshot.jsonl with exactly N lines, state.json with N objects "
        "and a delta link. Every baseline run counted exactly N objects and ended on a delta link.",
    ]
    if args.repeat > 1:
        spread = []
        for size in args.sizes:
            for mode in MODES:
                rates = [m.objects_per_second for m in runs[size][mode]]
                rss = [m.peak_rss_mib for m in runs[size][mode]]
                spread.append(
                    f"{mode} {size:,}: {min(rates):,.0f}-{max(rates):,.0f} obj/s, {min(rss):.1f}-{max(rss):.1f} MiB"
                )
        notes.append(f"Range over the {args.repeat} repeats: " + "; ".join(spread) + ".")
    for size in args.sizes:
        for m in results[size].values():
            if m.graph_errors:
                notes.append(f"{m.mode} at {size:,}: {m.graph_errors} Graph requests were not answered 200.")
    console.print("Notes:")
    for note in [*problems, *notes]:
        console.print(f"  - {note}", markup=False)
    return problems


# -- main --------------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    return sorted(set(positive_int_list("10000,100000")(text)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=[10_000, 100_000],
        help="comma-separated numbers of users (one tenant each); default 10000,100000",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each client per size (medians of times, highest peak RSS); default 3",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds the fake Graph waits before answering each request, as a distant Graph; default 0",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a single child run may take before it is stopped, beyond twice its pages' latency; default 300",
    )
    add_json_option(parser)
    # Internal: the baseline child.
    parser.add_argument("--child", choices=["baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeat < 1 or args.latency < 0:
        print("--repeat must be at least 1, --latency at least 0", file=sys.stderr)
        return 2
    if args.child == "baseline":
        return _baseline_main(args.url)

    import sqlite3

    from graphsync import __version__
    from tests.fakes.azurite import azurite_version
    from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
    from tests.fakes.graph import FakeGraph, populate

    started = time.monotonic()
    runs: dict[int, dict[str, list[Measurement]]] = {size: {"baseline": [], "graphsync": []} for size in args.sizes}
    with contextlib.ExitStack() as stack:
        try:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphsync-bench-sync-")))
            ca, ca_bundle = write_test_ca(workdir)
            azurite = start_azurite(stack, workdir)
            entra = stack.enter_context(FakeEntra(ca, client_id=CLIENT_ID, client_secret=CLIENT_SECRET))
            graph = stack.enter_context(FakeGraph(ca, entra, page_size=PAGE_SIZE))
            graph.latency_seconds = args.latency
            for size in args.sizes:
                print(f"populating the fake Graph with {size:,} users ...", file=sys.stderr, flush=True)
                populate(graph, tenant_for(size), size, 0, seed=size)
            bench = Bench(args, workdir, ca_bundle, azurite, entra, graph)
            floor = bench.interpreter_floor()
            for repeat in range(1, args.repeat + 1):
                for size in args.sizes:
                    for mode in ("baseline", "graphsync"):
                        print(
                            f"repeat {repeat}/{args.repeat}: {mode} over {size:,} objects ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        runs[size][mode].append(getattr(bench, mode)(size, repeat))
            commands = dict(bench.commands)
        except (BenchFailure, RuntimeError) as exc:  # RuntimeError: Azurite did not start
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    results = {
        size: {mode: summarize(measured) for mode, measured in by_mode.items()} for size, by_mode in runs.items()
    }
    context = {
        "command": command_line(argv),
        "parameters": (
            f"sizes {','.join(str(s) for s in args.sizes)}; {args.repeat} repeats of each run, "
            f"alternating; page size {PAGE_SIZE}; Graph latency {args.latency:g} s a request; users from "
            f"tests.fakes.graph.populate, one tenant per size; delta round with $select={','.join(SELECT)}"
        ),
        "graphsync child": shlex.join(commands["graphsync"]),
        "baseline child": shlex.join(commands["baseline"]),
        "versions": (
            f"graphsync {__version__}, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
            f"requests {package_version('requests')}, urllib3 {package_version('urllib3')}, "
            f"msal {package_version('msal')}, "
            f"azure-storage-blob {package_version('azure-storage-blob')}, pydantic {package_version('pydantic')}, "
            f"Azurite {azurite_version()}"
        ),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs",
        "run": run_line(started),
    }
    problems = report(args, runs, results, floor, context)
    if args.json:
        document = {
            "context": context,
            "interpreter_floor_peak_rss_mib": floor.peak_rss_mib,
            "summary": [results[size][mode].to_json() for size in args.sizes for mode in MODES],
            "runs": [m.to_json() for size in args.sizes for mode in MODES for m in runs[size][mode]],
            "memory_not_flat": problems,
        }
        dump_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
