"""`graphsync run` as real processes: fleet coordination, clean stops, systemd notify, health and metrics."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from graphsync.config import JobSettings
from graphsync.schedule import head_start, slot_jitter
from graphsync.timestamps import epoch
from tests.conftest import REPO_ROOT
from tests.fakes.graph import FakeGraph, mutate, populate

if TYPE_CHECKING:
    from tests.conftest import RunGraphsync, WriteConfig
    from tests.fakes.entra import FakeEntra

TENANTS = ["contoso.onmicrosoft.com", "fabrikam.onmicrosoft.com"]
USERS_SELECT = ["id", "displayName", "mail", "jobTitle"]
GROUPS_SELECT = ["id", "displayName", "members"]


def _jobs(every: str = "5s") -> list[dict[str, Any]]:
    return [
        {"name": "users", "resource": "users", "delta": True, "select": USERS_SELECT, "every": every},
        {"name": "groups", "resource": "groups", "delta": True, "select": GROUPS_SELECT, "every": every},
    ]


class Replica:
    """A `graphsync run` process whose logs go to a file (a pipe would fill up and stall it)."""

    def __init__(self, config: Path, log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "graphsync", "run", "--config", str(config)],
            cwd=REPO_ROOT,
            env=os.environ | {"PYTHONFAULTHANDLER": "1"} | env,  # SIGABRT dumps every thread's stack into the log
            stdout=self._file,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self, timeout: float = 10) -> tuple[int, float]:
        """SIGTERM; return the exit status and how long the process took to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout + 5)
        except subprocess.TimeoutExpired:  # the caller's assertion fails on the code and time; the log says why
            self.process.send_signal(signal.SIGABRT)  # faulthandler: where each thread was stuck, for the log
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
            code = self.process.wait()
        finally:
            self._file.close()
        return code, time.monotonic() - started

    def tail(self) -> str:
        text = self.log.read_text()
        stacks = text.find("Fatal Python error")  # a stop that hung: show the thread dump whole
        return text[stacks:][-20000:] if stacks >= 0 else text[-3000:]

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def replicas(tls_env: dict[str, str], tmp_path: Path):
    started: list[Replica] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Replica:
        replica = Replica(config, tmp_path / f"replica-{len(started)}.log", tls_env | (env or {}))
        started.append(replica)
        return replica

    yield start
    for replica in started:
        if replica.process.poll() is None:
            replica.stop()


def _snapshot(directory: Path, tenant: str, job: str) -> list[dict[str, Any]]:
    path = directory / tenant / job / "snapshot.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _truth(graph: FakeGraph, tenant: str, job: str, select: list[str]) -> list[dict[str, Any]]:
    return sorted(
        ({key: obj.get(key) for key in select} for obj in graph.objects(tenant, job).values()),
        key=lambda obj: obj["id"],
    )


def _assert_snapshots_match(graph: FakeGraph, output: Path, tenants: list[str]) -> None:
    for tenant in tenants:
        for job, select in (("users", USERS_SELECT), ("groups", GROUPS_SELECT)):
            got = [{key: obj.get(key) for key in select} for obj in _snapshot(output, tenant, job)]
            assert got == _truth(graph, tenant, job, select), f"{tenant}/{job} snapshot differs from the directory"


def _ready_at(replica: Replica, timeout: float = 60) -> float:
    """When the replica's scheduler started (its log says so): a loaded machine can take many seconds to get there."""

    def ready() -> float | None:
        return next(
            (_log_time(r["time"]) for r in replica.records() if r["message"].startswith("scheduler running")), None
        )

    _wait_for(lambda: ready() is not None, timeout, f"{replica.log.name} to start its scheduler")
    when = ready()
    assert when is not None
    return when


def _first_full_slot(fleet: list[Replica], every: int) -> int:
    """The first slot that begins with every replica up: slow starts on a loaded machine never make a slot look
    missed."""
    return int(max(_ready_at(replica) for replica in fleet) // every) + 1


def _sleep_past(slot: int, every: int) -> None:
    """Until ``slot`` has ended: every run it fired has started by then (a try starts at most 40 % into its slot)."""
    time.sleep(max(0.0, (slot + 1) * every + 1 - time.time()))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


# -- issue 4, must-show 5: a fleet of three replicas --------------------------------------------------------


@pytest.mark.slow
def test_three_replicas_run_each_job_once_per_interval_and_share_tokens(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, fake_entra: FakeEntra, replicas, tmp_path: Path
) -> None:
    every, usable = 5, 10
    fake_entra.expires_in = 300 + usable
    for seed, tenant in enumerate(TENANTS):
        populate(fake_graph, tenant, users=300, groups=12, seed=seed)
    output = tmp_path / "out"
    config = graphsync_config(
        tenants=TENANTS,
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(output)},
            "jobs": _jobs(f"{every}s"),
        },
    )
    fleet = [replicas(config) for _ in range(3)]
    started = time.time()

    stop_mutating = threading.Event()

    def change_the_directory() -> None:
        rng = random.Random(7)
        while not stop_mutating.wait(1.5):
            for tenant in TENANTS:
                mutate(fake_graph, tenant, rng, changes=5)

    mutator = threading.Thread(target=change_the_directory)
    mutator.start()
    first = _first_full_slot(fleet, every)
    full = range(first, first + 6)
    _sleep_past(full[3], every)  # four whole slots of a changing directory
    stop_mutating.set()
    mutator.join()
    _sleep_past(full[-1], every)  # and two without changes: every (tenant, job) has run after the last one
    for replica in fleet:
        code, took = replica.stop()
        assert code == 0 and took < 10, f"exit {code} {took:.1f} s after SIGTERM:\n{replica.tail()}"
    elapsed = time.time() - started

    runs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for replica in fleet:
        for record in replica.records():
            if record["message"].startswith("run ") and record["message"].endswith("started"):
                runs[record["tenant"], record["job"]].append(_log_time(record["time"]))
    assert set(runs) == {(tenant, job) for tenant in TENANTS for job in ("users", "groups")}
    for pair, times in runs.items():
        times.sort()
        slots = [int(t // every) for t in times]
        assert len(slots) == len(set(slots)), f"{pair} ran twice in one {every} s slot: {times}"
        assert set(full) <= set(slots), f"{pair} missed a slot: {slots} of {list(full)}"
        # By design runs of a pair are 2.5 s apart or more (a start-up run comes in the first half of its slot, a
        # slot's try at most 40 % into it); two replicas running it back to back would be well under a second
        # apart. A loaded machine was seen to start a run a second late: 1 s keeps that noise apart from a double.
        assert min(b - a for a, b in itertools.pairwise(times)) >= 1.0, f"{pair}: {times}"
    served_by = {replica.log.name for replica in fleet for r in replica.records() if r.get("run_id")}
    assert len(served_by) >= 2, "the work should be spread over the fleet, not pinned to one replica"

    lifetimes = elapsed / usable
    for tenant in TENANTS:
        requests = len(fake_entra.token_requests(tenant))
        assert requests <= lifetimes + 2, f"{tenant}: {requests} token requests in {lifetimes:.1f} lifetimes"
    _assert_snapshots_match(fake_graph, output, TENANTS)


def _log_time(text: str) -> float:
    """The JSON log's `time` field (ISO-8601 UTC) as unix seconds."""
    return epoch(text)


# -- issue 4, must-show 6: SIGTERM in the middle of a long sync ----------------------------------------------


def test_sigterm_mid_sync_stops_within_10_s_and_loses_nothing(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph, replicas, tmp_path: Path
) -> None:
    tenant = TENANTS[0]
    populate(fake_graph, tenant, users=3000, groups=0, seed=3)
    fake_graph.page_size = 100
    output = tmp_path / "out"
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(output)},
            "jobs": _jobs("5s")[:1],
        }
    )
    run_graphsync("sync", "--config", str(config))  # a first full sync: snapshot and cursor exist
    before = (output / tenant / "users" / "snapshot.jsonl").read_bytes()
    state_before = json.loads((output / tenant / "users" / "state.json").read_text())
    fake_graph.expire_delta_tokens()  # the daemon's first run becomes a long full resync
    mutate(fake_graph, tenant, random.Random(11), changes=40)
    fake_graph.slow_pages = 0.5
    fake_graph.reset_records()

    replica = replicas(config)
    _wait_for(lambda: len(fake_graph.requests) >= 6, 30, "the daemon to be several pages into its sync")
    code, took = replica.stop()
    assert code == 0, replica.log.read_text()[-2000:]
    assert took < 10
    job_dir = output / tenant / "users"
    assert (job_dir / "snapshot.jsonl").read_bytes() == before, "a stopped run must not publish"
    assert json.loads((job_dir / "state.json").read_text())["delta_link"] == state_before["delta_link"]
    assert not [p for p in output.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]

    fake_graph.slow_pages = 0
    result = run_graphsync("sync", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert [{k: o.get(k) for k in USERS_SELECT} for o in _snapshot(output, tenant, "users")] == _truth(
        fake_graph, tenant, "users", USERS_SELECT
    )


# -- issue 4, must-show 7: manual sync while a daemon replica runs the job -----------------------------------


def test_manual_sync_exits_3_while_a_replica_runs_the_job_or_waits_for_it(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph, replicas, tmp_path: Path
) -> None:
    tenant = TENANTS[0]
    populate(fake_graph, tenant, users=1500, groups=0, seed=5)
    fake_graph.page_size = 100
    fake_graph.slow_pages = 0.3  # the daemon's run takes about 5 s
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(tmp_path / "out")},
            "jobs": _jobs("5s")[:1],
        }
    )
    replicas(config)
    _wait_for(lambda: len(fake_graph.requests) >= 2, 30, "the daemon replica to start its run")
    busy = run_graphsync("sync", "--job", "users", "--config", str(config))
    assert busy.returncode == 3, busy.stdout + busy.stderr
    assert "running on another replica" in busy.stdout
    waited = run_graphsync("sync", "--job", "users", "--wait", "--config", str(config), timeout=90)
    assert waited.returncode == 0, waited.stdout + waited.stderr


# -- issue 5, must-show 1: systemd notify --------------------------------------------------------------------


def test_run_tells_systemd_ready_then_watchdog_then_stopping(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, replicas, tmp_path: Path
) -> None:
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(15)
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(tmp_path / "out")},
            "jobs": _jobs("1h")[:1],
        }
    )
    replica = replicas(config, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    messages = []
    with listener:
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        code, _ = replica.stop()
        while not any("STOPPING=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
    assert code == 0
    first = {
        kind: next(i for i, m in enumerate(messages) if kind in m) for kind in ("READY=1", "WATCHDOG=1", "STOPPING=1")
    }
    assert first["READY=1"] < first["WATCHDOG=1"] < first["STOPPING=1"], messages


# -- issue 5, must-show 2: health and metrics ----------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def _sample(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_and_health_endpoints_follow_a_running_daemon(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, replicas, tmp_path: Path
) -> None:
    tenant = TENANTS[0]
    populate(fake_graph, tenant, users=200, groups=5, seed=9)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(tmp_path / "out")},
            "jobs": _jobs("3s"),
            "metrics": {"port": port},
        }
    )
    replicas(config)
    base = f"http://127.0.0.1:{port}"
    _wait_for(lambda: _get(base + "/healthz")[0] == 200, 20, "/healthz")
    assert _get(base + "/readyz")[0] == 200

    def metrics() -> str:
        return _get(base + "/metrics")[1]

    _wait_for(lambda: _sample(metrics(), "graphsync_job_runs_total", result="ok") >= 2, 30, "the first runs")
    first = metrics()
    _wait_for(lambda: _sample(metrics(), "graphsync_job_runs_total", result="ok") >= 4, 30, "later runs")
    later = metrics()
    assert _sample(first, "graphsync_token_acquisitions_total", source="identity_provider") == 1
    assert _sample(later, "graphsync_token_acquisitions_total", source="memory") > _sample(
        first, "graphsync_token_acquisitions_total", source="memory"
    )
    assert _sample(later, "graphsync_storage_operations_total", operation="lease") > _sample(
        first, "graphsync_storage_operations_total", operation="lease"
    )
    assert _sample(later, "graphsync_graph_requests_total", status="200") > _sample(
        first, "graphsync_graph_requests_total", status="200"
    )
    assert _sample(later, "graphsync_objects_synced_total") >= 205
    assert _get(base + "/nothing")[0] == 404


# -- issue 9: work spreads over the fleet, and the last runner keeps its pairs -------------------------------


def _starts(replica: Replica) -> list[tuple[str, str, float]]:
    """(tenant, job, time) of each run the replica started."""
    return [
        (record["tenant"], record["job"], _log_time(record["time"]))
        for record in replica.records()
        if record["message"].startswith("run ") and record["message"].endswith(" started")
    ]


@pytest.mark.slow
def test_three_replicas_share_120_tenants_evenly_and_run_every_pair_once_per_slot(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, replicas, tmp_path: Path
) -> None:
    every = 15
    names = [f"tenant{index:03d}.onmicrosoft.com" for index in range(120)]
    for seed, tenant in enumerate(names):
        populate(fake_graph, tenant, users=20, groups=0, seed=seed)
    fake_graph.latency_seconds = 0.05
    config = graphsync_config(
        tenants=names,
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(tmp_path / "out")},
            "jobs": [
                {"name": "users", "resource": "users", "delta": True, "select": USERS_SELECT, "every": f"{every}s"}
            ],
        },
    )
    fleet = [replicas(config) for _ in range(3)]
    first = _first_full_slot(fleet, every)
    full = range(first, first + 3)
    _sleep_past(full[-1], every)
    for replica in fleet:
        code, took = replica.stop()
        assert code == 0 and took < 10, f"exit {code} {took:.1f} s after SIGTERM:\n{replica.tail()}"

    starts = [_starts(replica) for replica in fleet]
    slots: dict[str, list[int]] = defaultdict(list)
    for tenant, _, when in itertools.chain(*starts):
        slots[tenant].append(int(when // every))
    for tenant in names:
        assert len(slots[tenant]) == len(set(slots[tenant])), f"{tenant} ran twice in one slot: {sorted(slots[tenant])}"
        assert set(full) <= set(slots[tenant]), f"{tenant} missed a slot: {sorted(slots[tenant])} of {list(full)}"
    runs = [sum(int(when // every) in full for _, _, when in replica_starts) for replica_starts in starts]
    assert max(runs) / (sum(runs) / len(runs)) <= 1.3, f"runs per replica in the full slots: {runs}"


def test_the_last_runner_keeps_its_pair_and_a_killed_replicas_pair_moves_after_the_head_start_once(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, replicas, tmp_path: Path
) -> None:
    every = 5
    names = TENANTS
    for seed, tenant in enumerate(names):
        populate(fake_graph, tenant, users=20, groups=0, seed=seed)
    job = {"name": "users", "resource": "users", "delta": True, "select": USERS_SELECT, "every": f"{every}s"}
    config = graphsync_config(
        tenants=names,
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(tmp_path / "out")},
            "jobs": [job],
        },
    )
    a, b = replicas(config), replicas(config)
    names_of = {a: f"{socket.gethostname()}-{a.process.pid}", b: f"{socket.gethostname()}-{b.process.pid}"}

    def runner_by_slot() -> dict[tuple[str, int], list[Replica]]:
        ran: dict[tuple[str, int], list[Replica]] = defaultdict(list)
        for replica in (a, b):
            for tenant, _, when in _starts(replica):
                ran[tenant, int(when // every)].append(replica)
        return ran

    # Settle: two replicas, two pairs; the share rule moves one pair to whichever replica has none, then
    # affinity keeps each pair where it is.
    def settled_slot() -> int | None:
        slot = int(time.time() // every) - 1
        ran = runner_by_slot()
        owners = [ran[tenant, slot] for tenant in names]
        return slot if all(len(owner) == 1 for owner in owners) and {o[0] for o in owners} == {a, b} else None

    _wait_for(lambda: settled_slot() is not None, 15 * every, "one pair on each replica")
    first_settled = settled_slot()
    assert first_settled is not None
    time.sleep(3 * every)
    ran = runner_by_slot()
    owners = {tenant: ran[tenant, first_settled] for tenant in names}
    for tenant in names:
        for slot in range(first_settled + 1, first_settled + 4):
            assert ran[tenant, slot] == owners[tenant], f"{tenant}: the last runner should keep it, slot {slot}"
    skips = [r["message"] for r in b.records() if " skipped: already ran at " in r["message"]]
    assert any(names_of[a] in message for message in skips), "the other replica skips, naming who ran"

    # Kill a (no lease held: after its run of this slot has ended, a second or more before the next slot), then b
    # takes its pair after the head start, once a slot.
    [[dead_pair]] = [[tenant for tenant in names if owners[tenant] == [a]]]

    def between_runs() -> bool:
        now = time.time()
        return now % every < every - 1 and any(
            r.get("tenant") == dead_pair
            and r.get("run_id")
            and " objects, " in r["message"]
            and int(_log_time(r["time"]) // every) == int(now // every)
            for r in a.records()
        )

    _wait_for(between_runs, 3 * every, "a's run of its pair to end")
    a.process.kill()
    a.process.wait()
    killed_slot = int(time.time() // every)
    time.sleep(3 * every)
    ran = runner_by_slot()
    after = [killed_slot + 1, killed_slot + 2]
    for slot in after:
        assert ran[dead_pair, slot] == [b], f"slot {slot}: {ran[dead_pair, slot]}"
    taken = [when for tenant, _, when in _starts(b) if tenant == dead_pair and int(when // every) == after[0]]
    slot_begin = after[0] * every
    delay = taken[0] - slot_begin - slot_jitter(_job_settings(job), f"{dead_pair}/users", slot_begin)
    assert head_start(_job_settings(job)) <= delay < every - 1, f"taken over {delay:.2f} s after its due time"
    code, took = b.stop()
    assert code == 0 and took < 10


def _job_settings(job: dict[str, Any]) -> JobSettings:
    return JobSettings(**job)
