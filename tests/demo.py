"""The graphsync demo: three `graphsync run` replicas share one token cache while an emulated directory changes.

Run from the repository root with ``make demo`` (it runs ``make setup`` first) or ``.venv/bin/python -m tests.demo``.
Everything is local: Azurite for blob storage, and the test fakes of the Entra token endpoint and of Microsoft Graph
(HTTPS with a throwaway CA), served from this process. It lives beside the fakes because they are not part of the
installed package.

What it does, in about 75-90 s:

1. wipes ``.demo/`` and starts Azurite, the fake Entra (tokens of 300 + 20 s, so 20 s usable: they turn over a few
   times) and the fake Graph with two tenants of about 500 users and 20 groups each;
2. writes ``.demo/graphsync.toml`` (jobs ``users`` and ``groups``, delta, every 10 s, output ``.demo/output``) and
   runs ``graphsync check`` on it when that command exists;
3. starts three replicas, each with its own metrics port, logging to ``.demo/logs/``;
4. changes the directory every few seconds for about 45 s, then leaves it quiet for about 15 s;
5. scrapes each replica's ``/metrics``, stops the replicas with SIGTERM, runs ``graphsync status`` and prints a
   summary, then checks that every snapshot equals the emulated directory (exit status 1 if one differs).

Ctrl-C at any point stops the replicas, Azurite and the emulators, and exits with status 130.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trustme
from azure.storage.blob import BlobServiceClient
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console
from rich.table import Table

from graphsync.timestamps import epoch
from tests.conftest import dumps_toml
from tests.fakes.azurite import REPO_ROOT, Azurite, azurite_executable, free_port
from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
from tests.fakes.graph import FakeGraph, mutate, populate

WORK = REPO_ROOT / ".demo"
OUTPUT = WORK / "output"
LOGS = WORK / "logs"
CONFIG = WORK / "graphsync.toml"

TENANTS = ["contoso.onmicrosoft.com", "fabrikam.onmicrosoft.com"]
USERS, GROUPS = 500, 20
JOBS = {  # job name -> $select; both are delta jobs on the collection of the same name
    "users": ["id", "displayName", "mail", "jobTitle"],
    "groups": ["id", "displayName", "members"],
}
EVERY = 10  # seconds between runs of each (tenant, job), fleet-wide
REPLICAS = 3
MSAL_EXPIRY_MARGIN = 300  # MSAL treats a token with under 5 minutes left as expired
USABLE_LIFETIME = 20  # so the fake Entra issues expires_in = 320
CHANGING, QUIET = 45.0, 15.0  # seconds of directory changes, then of calm before the replicas stop
CHANGE_EVERY, CHANGES_PER_TENANT = 3.0, 4
CATCH_UP = 20.0  # at most this much longer, if a job has not yet run after the last change
PROGRESS_EVERY = 10.0
SEED = 2024

# On a terminal, its width; piped (to a file, tee, CI), wide enough that the tables stay readable.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def say(text: str = "", *, markup: bool = True) -> None:
    console.print(text, markup=markup, soft_wrap=True)


def rel(path: Path) -> str:
    """A path as the reader would type it from the repository root."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


class DemoFailure(Exception):
    """Something the demo needs did not work; the message says what and where to look."""


# -- the daemon, as a command and as replicas ------------------------------------------------------------


def graphsync() -> list[str]:
    """The installed ``graphsync`` console script, or its equivalent ``python -m daemon``."""
    script = Path(sys.executable).with_name("graphsync")
    return [str(script)] if script.exists() else [sys.executable, "-m", "graphsync"]


def child_env(ca_pem: Path, **extra: str) -> dict[str, str]:
    """This environment without the reader's own GRAPHSYNC_* settings, trusting the demo CA."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GRAPHSYNC_")}
    if not console.is_terminal:
        env["COLUMNS"] = str(console.width)  # graphsync's own tables (rich) then match the demo's
    return env | {"REQUESTS_CA_BUNDLE": str(ca_pem), "PYTHONUNBUFFERED": "1"} | extra


@dataclass
class Replica:
    """One `graphsync run` process, logging to a file, with its metrics on its own port."""

    number: int
    port: int
    log: Path
    process: subprocess.Popen[bytes]
    _file: IO[bytes]
    exit_code: int | None = None  # None: killed after not stopping in time
    stop_seconds: float | None = None  # from SIGTERM to exit
    _signalled: float = 0.0

    @classmethod
    def start(cls, number: int, ca_pem: Path) -> Replica:
        port = free_port()
        log = LOGS / f"replica-{number}.log"
        file = log.open("wb")
        # Its own session: Ctrl-C reaches only the demo, which then stops the replicas in order.
        process = subprocess.Popen(
            [*graphsync(), "run", "--config", str(CONFIG)],
            cwd=REPO_ROOT,
            # Each replica is its own host, with working stores of its own (.demo/hosts/replica-N/).
            env=child_env(ca_pem, GRAPHSYNC_METRICS__PORT=str(port), XDG_CACHE_HOME=str(WORK / "hosts" / log.stem)),
            stdin=subprocess.DEVNULL,
            stdout=file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return cls(number, port, log, process, file)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""
        except OSError:
            return 0, ""

    def scrape(self) -> list[tuple[str, dict[str, str], float]]:
        """The counters of /metrics as (name, labels, value), or nothing if the replica does not answer."""
        status, text = self.get("/metrics")
        if status != 200:
            return []
        return [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.endswith("_total")
        ]

    def tail(self, limit: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def terminate(self) -> None:
        self._signalled = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def reap(self, *, kill: bool = False) -> bool:
        """True once the process has exited (killed first if ``kill``) and its log is closed."""
        if self._file.closed:
            return True
        if kill and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            self.exit_code = None
        elif self.process.poll() is None:
            return False
        else:
            self.exit_code = self.process.returncode
        self.stop_seconds = time.monotonic() - self._signalled
        self._file.close()
        return True


def stop_all(replicas: list[Replica], grace: float = 15) -> None:
    """SIGTERM every replica at once, wait for them to exit, and kill any still running after ``grace`` s."""
    running = [replica for replica in replicas if not replica._file.closed]
    for replica in running:
        replica.terminate()
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        running = [replica for replica in running if not replica.reap()]
        time.sleep(0.05)
    for replica in running:
        replica.reap(kill=True)


# -- counters ---------------------------------------------------------------------------------------------


@dataclass
class Metrics:
    """Counter samples summed over every replica scraped."""

    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def total(self, name: str, **labels: str) -> int:
        return int(
            sum(
                value
                for sample, have, value in self.samples
                if sample == name and all(have.get(k) == v for k, v in labels.items())
            )
        )

    def by(self, name: str, label: str, **labels: str) -> Counter[str]:
        counts: Counter[str] = Counter()
        for sample, have, value in self.samples:
            if sample == name and all(have.get(k) == v for k, v in labels.items()):
                counts[have[label]] += int(value)
        return counts


def scrape_all(replicas: list[Replica]) -> Metrics:
    return Metrics([sample for replica in replicas for sample in replica.scrape()])


def breakdown(counts: Counter[str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.most_common()) or "-"


# -- the changing directory -------------------------------------------------------------------------------


class Mutator(threading.Thread):
    """Changes both tenants' directories every few seconds, reproducibly, until told to stop."""

    def __init__(self, graph: FakeGraph) -> None:
        super().__init__(name="mutator", daemon=True)
        self.graph = graph
        self.rng = random.Random(SEED)
        self.halt = threading.Event()
        self.changes: Counter[str] = Counter()
        self.last_change = 0.0  # unix time

    def run(self) -> None:
        while not self.halt.wait(CHANGE_EVERY):
            for tenant in TENANTS:
                done = mutate(self.graph, tenant, self.rng, changes=CHANGES_PER_TENANT)
                self.changes[tenant] += len(done)
            self.last_change = time.time()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


# -- output checks ----------------------------------------------------------------------------------------


def job_dir(tenant: str, job: str) -> Path:
    return OUTPUT / tenant / job


def ran_since(tenant: str, job: str, since: float) -> bool:
    """True once a successful run of (tenant, job) started at or after ``since`` (unix time)."""
    try:
        state = json.loads((job_dir(tenant, job) / "state.json").read_text())
        return epoch(state["last_success_started"]) >= since
    except (OSError, ValueError, KeyError, TypeError):
        return False


def compare(graph: FakeGraph, tenant: str, job: str) -> tuple[int, str | None]:
    """(objects in the snapshot, None if it equals the emulated directory, else how it differs)."""
    select = JOBS[job]
    path = job_dir(tenant, job) / "snapshot.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0, f"no {rel(path)}"
    got = {obj["id"]: {key: obj.get(key) for key in select} for obj in map(json.loads, lines)}
    truth = {oid: {key: obj.get(key) for key in select} for oid, obj in graph.objects(tenant, job).items()}
    missing = truth.keys() - got.keys()
    extra = got.keys() - truth.keys()
    stale = [oid for oid in truth.keys() & got.keys() if truth[oid] != got[oid]]
    if not (missing or extra or stale):
        return len(got), None
    return len(got), (
        f"{len(missing)} missing, {len(extra)} that should be gone, {len(stale)} out of date"
        + (f" (e.g. {sorted(stale)[0]})" if stale else "")
    )


def show_head(path: Path, lines: int = 3, width: int = 200) -> None:
    say(f"  [dim]$ head -n {lines} {rel(path)}[/dim]")
    with path.open(errors="replace") as file:
        for line, _ in zip(file, range(lines), strict=False):
            line = line.rstrip("\n")
            say("  " + (line if len(line) <= width else line[: width - 1] + "…"), markup=False)


# -- the demo ---------------------------------------------------------------------------------------------


def write_config(entra: FakeEntra, graph: FakeGraph, azurite: Azurite) -> None:
    (WORK / "client-secret").write_text(CLIENT_SECRET + "\n")
    (WORK / "cache-key").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    for path in (WORK / "client-secret", WORK / "cache-key"):
        path.chmod(0o600)
    CONFIG.write_text(
        "# Written by `python -m tests.demo`; relative files are next to this one.\n"
        + dumps_toml(
            {
                "log_level": "INFO",
                "identity": {
                    "client_id": CLIENT_ID,
                    "tenants": TENANTS,
                    "authority_host": entra.authority_host,
                    "client_secret_file": "client-secret",
                },
                "storage": {
                    "connection_string": azurite.connection_string,
                    "container": "graphsync",
                    "encryption_key_file": "cache-key",
                },
                "graph": {"endpoint": graph.base_url},
                "output": {"directory": str(OUTPUT)},
                "jobs": [
                    {"name": job, "resource": job, "delta": True, "select": select, "every": f"{EVERY}s"}
                    for job, select in JOBS.items()
                ],
            }
        )
    )


def run_command(ca_pem: Path, *args: str) -> int:
    """Run ``graphsync ARGS --config CONFIG`` in the foreground, its output straight to the terminal."""
    say(f"[dim]$ graphsync {' '.join(args)} --config {rel(CONFIG)}[/dim]")
    sys.stdout.flush()
    return subprocess.run(
        [*graphsync(), *args, "--config", str(CONFIG)],
        cwd=REPO_ROOT,
        env=child_env(ca_pem, XDG_CACHE_HOME=str(WORK / "hosts" / "commands")),
        stdin=subprocess.DEVNULL,
        check=False,
    ).returncode


def has_command(name: str) -> bool:
    return (
        subprocess.run(
            [sys.executable, "-m", "graphsync", name, "--help"], cwd=REPO_ROOT, capture_output=True, check=False
        ).returncode
        == 0
    )


def wait_ready(replicas: list[Replica], timeout: float = 60) -> float:
    started = time.monotonic()
    waiting = list(replicas)
    while waiting:
        for replica in list(waiting):
            if replica.process.poll() is not None:
                raise DemoFailure(
                    f"replica {replica.number} exited with code {replica.process.returncode} "
                    f"while starting; end of {rel(replica.log)}:\n{replica.tail()}"
                )
            if replica.get("/readyz")[0] == 200:
                waiting.remove(replica)
        if time.monotonic() - started > timeout:
            raise DemoFailure(
                f"replica(s) {', '.join(str(r.number) for r in waiting)} not ready after "
                f"{timeout:.0f} s; see {', '.join(rel(r.log) for r in waiting)}"
            )
        time.sleep(0.2)
    return time.monotonic() - started


def check_alive(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.process.poll() is not None:
            raise DemoFailure(
                f"replica {replica.number} exited with code {replica.process.returncode}; "
                f"end of {rel(replica.log)}:\n{replica.tail()}"
            )


def idp_requests(entra: FakeEntra, since: float) -> Counter[str]:
    return Counter(r.tenant for r in entra.token_requests() if r.time >= since)


def progress(t: float, mutator: Mutator, entra: FakeEntra, since: float, replicas: list[Replica]) -> None:
    metrics = scrape_all(replicas)
    runs = metrics.by("graphsync_job_runs_total", "result")
    idp = idp_requests(entra, since)
    say(
        f"  [{t:3.0f} s] {sum(mutator.changes.values())} directory changes · runs {breakdown(runs)} · "
        f"records applied {metrics.total('graphsync_objects_synced_total')} · IdP token requests "
        f"{sum(idp.values())} · lease contention "
        f"{metrics.total('graphsync_storage_operations_total', operation='lease', result='lease_held')}",
        markup=False,
    )


def demo(stack: contextlib.ExitStack, replicas: list[Replica]) -> int:
    began = time.monotonic()
    say("[bold]graphsync demo[/bold]: three replicas, two tenants, one token cache shared through blob storage")
    if WORK.exists():
        shutil.rmtree(WORK)
    LOGS.mkdir(parents=True)
    OUTPUT.mkdir()
    say(f"▸ work dir {rel(WORK)}/ (wiped); logs in {rel(LOGS)}/")

    emulator_log = logging.FileHandler(LOGS / "emulators.log")
    emulator_log.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    fakes_logger = logging.getLogger("tests.fakes")
    fakes_logger.addHandler(emulator_log)
    fakes_logger.setLevel(logging.INFO)
    stack.callback(fakes_logger.removeHandler, emulator_log)
    stack.callback(emulator_log.close)

    ca = trustme.CA()
    ca_pem = WORK / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    (WORK / "azurite").mkdir()
    azurite = Azurite(azurite_executable(), WORK / "azurite", LOGS, free_port())
    stack.callback(azurite.stop)
    azurite.start()
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        service.create_container("graphsync")
    say(
        f"▸ Azurite blob storage on 127.0.0.1:{azurite.port} (data {rel(WORK / 'azurite')}/, "
        f"log {rel(LOGS)}/azurite.*.log), container 'graphsync'"
    )

    entra = stack.enter_context(
        FakeEntra(ca, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, expires_in=MSAL_EXPIRY_MARGIN + USABLE_LIFETIME)
    )
    say(
        f"▸ emulated Entra token endpoint {entra.authority_host}: tokens with expires_in "
        f"{MSAL_EXPIRY_MARGIN + USABLE_LIFETIME} s, i.e. {USABLE_LIFETIME} s usable (MSAL renews with 5 min left); "
        f"TLS from the CA in {rel(ca_pem)}"
    )
    graph = stack.enter_context(FakeGraph(ca, entra))
    for seed, tenant in enumerate(TENANTS):
        populate(graph, tenant, users=USERS, groups=GROUPS, seed=seed)
    say(
        f"▸ emulated Microsoft Graph {graph.base_url}: "
        + "; ".join(
            f"{tenant} {len(graph.objects(tenant, 'users'))} users, {len(graph.objects(tenant, 'groups'))} groups"
            for tenant in TENANTS
        )
        + f" (requests logged to {rel(LOGS / 'emulators.log')})"
    )

    write_config(entra, graph, azurite)
    say(
        f"▸ configuration {rel(CONFIG)}: jobs "
        + ", ".join(f"{job} (delta, $select {','.join(select)})" for job, select in JOBS.items())
        + f" every {EVERY} s for both tenants; output {rel(OUTPUT)}/; token cache encrypted with "
        f"{rel(WORK / 'cache-key')}"
    )

    say()
    if has_command("check"):
        say("▸ preflight")
        code = run_command(ca_pem, "check")
        if code != 0:
            say(f"[yellow]  graphsync check exited {code}; carrying on, the replicas will show what it means[/yellow]")
    else:
        say("▸ preflight skipped: this graphsync has no `check` command yet")

    say()
    started = time.time()
    for number in range(1, REPLICAS + 1):
        replica = Replica.start(number, ca_pem)
        replicas.append(replica)
        say(
            f"▸ replica {number}: graphsync run (pid {replica.process.pid}), metrics {replica.url}/metrics, "
            f"log {rel(replica.log)}"
        )
    ready = wait_ready(replicas)
    say(f"▸ all {REPLICAS} replicas ready (/readyz 200) after {ready:.1f} s")

    mutator = Mutator(graph)
    mutator.start()
    stack.callback(mutator.stop)
    say(
        f"▸ changing the directory ({CHANGES_PER_TENANT} changes per tenant every {CHANGE_EVERY:g} s: adds, "
        f"updates, deletes, restores, membership) for {CHANGING:g} s, then {QUIET:g} s quiet"
    )
    clock = time.monotonic()
    next_report = clock + PROGRESS_EVERY
    while (now := time.monotonic()) < clock + CHANGING + QUIET:
        if mutator.is_alive() and now >= clock + CHANGING:
            mutator.stop()
            say(f"  [{now - clock:3.0f} s] directory quiet from now on", markup=False)
        if now >= next_report:
            check_alive(replicas)
            progress(now - clock, mutator, entra, started, replicas)
            next_report += PROGRESS_EVERY
        time.sleep(0.2)
    mutator.stop()

    # Stop only once every (tenant, job) has run after the last change, or the snapshots cannot match yet.
    pending = [(t, j) for t in TENANTS for j in JOBS if not ran_since(t, j, mutator.last_change)]
    if pending:
        say(
            f"  waiting up to {CATCH_UP:g} s for "
            + ", ".join(f"{t}/{j}" for t, j in pending)
            + " to run once after the last change",
            markup=False,
        )
        deadline = time.monotonic() + CATCH_UP
        while pending and time.monotonic() < deadline:
            check_alive(replicas)
            time.sleep(0.5)
            pending = [(t, j) for t, j in pending if not ran_since(t, j, mutator.last_change)]

    per_replica = [Metrics(replica.scrape()) for replica in replicas]
    metrics = Metrics([sample for m in per_replica for sample in m.samples])
    say(f"▸ scraped /metrics of {sum(bool(m.samples) for m in per_replica)} replicas; stopping them with SIGTERM")
    stop_all(replicas)
    elapsed = time.time() - started
    idp = idp_requests(entra, started)
    preflight_idp = len(entra.token_requests()) - sum(idp.values())
    say("  " + "; ".join(f"replica {r.number} exited {r.exit_code} in {r.stop_seconds:.1f} s" for r in replicas))

    say()
    run_command(ca_pem, "status")

    # -- summary ---------------------------------------------------------------------------------------
    snapshots = {(t, j): compare(graph, t, j) for t in TENANTS for j in JOBS}
    lifetimes = elapsed / USABLE_LIFETIME
    storage = "graphsync_storage_operations_total"
    runs = metrics.by("graphsync_job_runs_total", "result")
    table = Table(title="Summary", title_justify="left", box=box.SIMPLE_HEAVY, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column()
    clean = all(r.exit_code == 0 for r in replicas)
    table.add_row(
        "replicas",
        str(REPLICAS),
        ("each exited 0 on SIGTERM" if clean else "[red]not all exited 0[/red]")
        + f", within {max(r.stop_seconds or 0 for r in replicas):.1f} s",
    )
    table.add_row("duration", f"{elapsed:.0f} s", f"{CHANGING:g} s of changes, then quiet; jobs every {EVERY} s")
    table.add_row("directory changes", str(sum(mutator.changes.values())), breakdown(mutator.changes))
    for tenant in TENANTS:
        table.add_row(
            f"IdP token requests {tenant.split('.')[0]}",
            str(idp[tenant]),
            f"over {lifetimes:.1f} token lifetimes of {USABLE_LIFETIME} s, for all {REPLICAS} replicas "
            "together (one shared token at a time, fetched when a run needs it)",
        )
    if preflight_idp:
        table.add_row(
            "IdP token requests preflight",
            str(preflight_idp),
            "by graphsync check, before the replicas (not counted above)",
        )
    table.add_row(
        "token acquisitions",
        str(metrics.total("graphsync_token_acquisitions_total")),
        "by source: " + breakdown(metrics.by("graphsync_token_acquisitions_total", "source")),
    )
    table.add_row(
        "storage reads",
        str(metrics.total(storage, operation="read")),
        breakdown(metrics.by(storage, "result", operation="read")),
    )
    table.add_row(
        "storage writes",
        str(metrics.total(storage, operation="write")),
        breakdown(metrics.by(storage, "result", operation="write")),
    )
    table.add_row(
        "write conflicts (412/409)",
        str(metrics.total(storage, operation="write", result="conflict")),
        "another replica wrote first: cache re-read and merged, or lock blob already there",
    )
    table.add_row(
        "lease attempts",
        str(metrics.total(storage, operation="lease")),
        "token refreshes and job locks: " + breakdown(metrics.by(storage, "result", operation="lease")),
    )
    table.add_row(
        "lease contention",
        str(metrics.total(storage, operation="lease", result="lease_held")),
        "lease held by another replica",
    )
    table.add_row(
        "job runs",
        str(sum(runs.values())),
        breakdown(runs)
        + "; ok per replica: "
        + " / ".join(str(m.total("graphsync_job_runs_total", result="ok")) for m in per_replica),
    )
    table.add_row(
        "objects synced",
        str(metrics.total("graphsync_objects_synced_total")),
        "records received from Graph and applied; snapshots now hold "
        + ", ".join(f"{t.split('.')[0]}/{j} {n}" for (t, j), (n, _) in snapshots.items()),
    )
    say()
    console.print(table)

    differs = {pair: why for pair, (_, why) in snapshots.items() if why}
    if differs:
        for (tenant, job), why in differs.items():
            say(f"[red]✗ {rel(job_dir(tenant, job) / 'snapshot.jsonl')} differs from the directory: {why}[/red]")
    else:
        say(
            f"[green]✓ snapshots match the directory[/green] ({len(snapshots)} snapshots: "
            f"{len(TENANTS)} tenants x {len(JOBS)} jobs)"
        )

    say()
    say(
        f"▸ output in {rel(OUTPUT)}/<tenant>/<job>/: snapshot.jsonl (current state), changes/*.jsonl (what each "
        f"run received), state.json (delta link, last run)"
    )
    example = job_dir(TENANTS[0], "users")
    if (example / "snapshot.jsonl").exists():
        show_head(example / "snapshot.jsonl")
    change_files = sorted((example / "changes").glob("*.jsonl"))
    delta_files = [p for p in change_files if not p.stem.endswith("-full")]
    if delta_files or change_files:
        show_head((delta_files or change_files)[-1])
    say(f"▸ replica logs: {', '.join(rel(r.log) for r in replicas)}; done in {time.monotonic() - began:.0f} s")
    return 1 if differs or not clean else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C
    replicas: list[Replica] = []
    with contextlib.ExitStack() as stack:  # on leaving: the mutator, the emulators, Azurite
        try:
            return demo(stack, replicas)
        except KeyboardInterrupt:
            say("\n[yellow]interrupted: stopping the replicas, the emulators and Azurite[/yellow]")
            return 130
        except (DemoFailure, RuntimeError) as exc:  # RuntimeError: Azurite did not start
            console.print("[red]demo failed:[/red]", end=" ")
            say(str(exc), markup=False)
            return 1
        finally:
            stop_all(replicas)  # before the services they talk to go away


if __name__ == "__main__":
    sys.exit(main())
