"""`graphsync sync` over many tenants: a bounded pool whose time follows the slowest tenant, not the sum of all.

Graph and the identity provider answer with a latency here, as the real ones do, so that what is measured is how
runs overlap, not how fast this machine parses JSON. Each test runs the real command as a process.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from graphsync.timestamps import epoch
from tests.fakes.graph import FakeGraph, mutate, populate

if TYPE_CHECKING:
    from tests.conftest import RunGraphsync, StartGraphsync, WriteConfig
    from tests.fakes.entra import FakeEntra

SELECT = ["displayName", "mail", "jobTitle"]
GRAPH_LATENCY = 0.3
ENTRA_LATENCY = 0.15


def tenants(count: int) -> list[str]:
    return [f"tenant{index:03d}.onmicrosoft.com" for index in range(count)]


def job(name: str, resource: str | None = None) -> dict[str, Any]:
    return {"name": name, "resource": resource or name, "delta": True, "select": SELECT, "every": "1h"}


def write_config(
    graphsync_config: WriteConfig,
    graph: FakeGraph,
    output: Path,
    names: list[str],
    jobs: list[dict[str, Any]],
    **extra: Any,
) -> Path:
    return graphsync_config(
        tenants=names,
        extra={"graph": {"endpoint": graph.base_url}, "output": {"directory": str(output)}, "jobs": jobs, **extra},
    )


def run_starts(stderr: str) -> list[tuple[str, str, float]]:
    """(tenant, job, time) of every run the JSON log says started, in log order."""
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [
        (record["tenant"], record["job"], epoch(record["time"]))
        for record in records
        if record["message"].startswith("run ") and record["message"].endswith(" started")
    ]


def started_once_each(stderr: str) -> Counter[str]:
    return Counter(tenant for tenant, _, _ in run_starts(stderr))


def snapshot(output: Path, tenant: str, job: str = "users") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / tenant / job / "snapshot.jsonl").read_text().splitlines()]


def truth(graph: FakeGraph, tenant: str) -> list[dict[str, Any]]:
    return sorted(
        ({"id": oid, **{key: obj.get(key) for key in SELECT}} for oid, obj in graph.objects(tenant, "users").items()),
        key=lambda obj: obj["id"],
    )


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """The tab-separated summary (stdout is not a terminal here), by tenant."""
    return {row[0]: row for row in (line.split("\t") for line in stdout.splitlines()[1:]) if len(row) == 6}


def assert_no_partial_files(output: Path) -> None:
    assert not [path for path in output.rglob("*") if path.name.endswith(".tmp")], "a temp file was left behind"


# -- the time of a sync follows the slowest tenant ---------------------------------------------------------


def test_sync_over_50_tenants_runs_8_at_once_and_takes_at_most_half_the_serial_latency(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    fake_entra: FakeEntra,
    run_graphsync: RunGraphsync,
    tmp_path: Path,
) -> None:
    names = tenants(50)
    for seed, tenant in enumerate(names):
        populate(fake_graph, tenant, users=25, groups=0, seed=seed)
    fake_graph.page_size = 5  # five pages a tenant
    fake_graph.latency_seconds = GRAPH_LATENCY
    fake_entra.latency_seconds = ENTRA_LATENCY
    output = tmp_path / "out"
    config = write_config(graphsync_config, fake_graph, output, names, [job("users")])

    started = time.monotonic()
    result = run_graphsync("sync", "--config", str(config), timeout=120)
    wall = time.monotonic() - started

    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    serial = len(fake_graph.requests) * GRAPH_LATENCY + len(fake_entra.token_requests()) * ENTRA_LATENCY
    assert len(fake_graph.requests) == 250 and serial >= 75
    # The overlap is counted, not timed: the pool had [run] concurrency = 8 requests in flight at once, never more.
    # The wall time only has to rule out a hidden serialization; 8 at once take about 1/8 of the serial sum, so
    # half of it holds on a machine several times slower than this one under load.
    assert fake_graph.max_concurrent_requests() == 8
    assert wall <= 0.5 * serial, f"{wall:.1f} s for a serial sum of latencies of {serial:.1f} s"
    assert started_once_each(result.stderr) == dict.fromkeys(names, 1)
    for tenant in names:
        assert snapshot(output, tenant) == truth(fake_graph, tenant)


@pytest.mark.parametrize("trouble", ["429 storm", "hang"])
def test_a_throttled_or_hanging_tenant_delays_nobody_else_and_sigterm_still_stops_the_sync(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    start_graphsync: StartGraphsync,
    tmp_path: Path,
    trouble: str,
) -> None:
    names = tenants(12)
    stuck, others = names[0], names[1:]  # the first pair in order: it takes a worker before any other
    for seed, tenant in enumerate(names):
        populate(fake_graph, tenant, users=25, groups=0, seed=seed)
    fake_graph.page_size = 10
    fake_graph.latency_seconds = 0.1
    if trouble == "429 storm":
        fake_graph.throttle_for(stuck, 60, retry_after="60")
    else:
        fake_graph.hang(stuck, 60)
    output = tmp_path / "out"
    config = write_config(graphsync_config, fake_graph, output, names, [job("users")])

    started = time.monotonic()
    process = start_graphsync("sync", "--config", str(config))
    deadline = started + 30
    while not all((output / tenant / "users" / "state.json").exists() for tenant in others):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the other tenants did not finish"
        time.sleep(0.1)
    assert process.poll() is None, "the troubled tenant is still running"
    assert fake_graph.max_concurrent_requests(stuck) >= 1, "the troubled tenant did start"

    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    stdout, stderr = process.communicate(timeout=15)
    took = time.monotonic() - signalled

    # The others finished inside the 30 s deadline above while the trouble lasts a minute: nobody waited for it.
    assert took < 10, f"exited {took:.1f} s after SIGTERM"
    assert process.returncode == 1, stdout + stderr[-3000:]
    rows = summary_rows(stdout)
    assert rows[stuck][5].startswith("stopped"), stdout
    assert all(rows[tenant][5] == "ok" for tenant in others), stdout
    assert not (output / stuck / "users" / "snapshot.jsonl").exists()
    assert_no_partial_files(output)


# -- SIGTERM while 8 runs are in flight ----------------------------------------------------------------------


def test_sigterm_during_8_concurrent_runs_stops_within_10_s_and_leaves_no_partial_file_or_early_cursor(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    run_graphsync: RunGraphsync,
    start_graphsync: StartGraphsync,
    tmp_path: Path,
) -> None:
    names = tenants(12)
    for seed, tenant in enumerate(names):
        populate(fake_graph, tenant, users=300, groups=0, seed=seed)
    fake_graph.page_size = 10
    output = tmp_path / "out"
    config = write_config(graphsync_config, fake_graph, output, names, [job("users")])
    first = run_graphsync("sync", "--config", str(config), timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {tenant: (output / tenant / "users" / "snapshot.jsonl").read_bytes() for tenant in names}
    cursors = {tenant: json.loads((output / tenant / "users" / "state.json").read_text()) for tenant in names}
    fake_graph.expire_delta_tokens()  # every run becomes a full resync of 30 pages
    rng = random.Random(3)
    for tenant in names:
        mutate(fake_graph, tenant, rng, changes=5)
    fake_graph.latency_seconds = 0.2
    fake_graph.reset_records()

    process = start_graphsync("sync", "--config", str(config))
    deadline = time.monotonic() + 30
    while fake_graph.max_concurrent_requests() < 8 or len(fake_graph.requests) < 24:
        assert time.monotonic() < deadline and process.poll() is None, "8 runs never were in flight together"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    signalled = time.time()
    stdout, stderr = process.communicate(timeout=15)
    took = time.time() - signalled

    assert took < 10, f"exited {took:.1f} s after SIGTERM"
    assert process.returncode == 1, stdout + stderr[-3000:]
    assert_no_partial_files(output)
    starts = started_once_each(stderr)
    assert 8 <= len(starts) < len(names) and set(starts.values()) == {1}, f"each pair at most once: {starts}"
    assert max(when for _, _, when in run_starts(stderr)) < signalled, "nothing starts after SIGTERM"
    for tenant in names:
        state = json.loads((output / tenant / "users" / "state.json").read_text())
        data = (output / tenant / "users" / "snapshot.jsonl").read_bytes()
        if state["delta_link"] != cursors[tenant]["delta_link"]:  # finished before the signal: data first
            assert [json.loads(line) for line in data.splitlines()] == truth(fake_graph, tenant)
        else:
            assert data == before[tenant], f"{tenant}: a stopped run published"

    fake_graph.latency_seconds = 0
    fake_graph.reset_records()
    again = run_graphsync("sync", "--config", str(config), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert started_once_each(again.stderr) == dict.fromkeys(names, 1)
    for tenant in names:
        assert snapshot(output, tenant) == truth(fake_graph, tenant)


# -- the bounds ---------------------------------------------------------------------------------------------------


def test_runs_of_one_tenant_never_exceed_per_tenant_and_parallel_1_keeps_the_configured_order(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, tmp_path: Path
) -> None:
    names = tenants(3)
    for seed, tenant in enumerate(names):
        populate(fake_graph, tenant, users=40, groups=0, seed=seed)
    fake_graph.page_size = 10
    fake_graph.latency_seconds = 0.2
    jobs = [job("users"), job("staff", "users"), job("people", "users"), job("everyone", "users")]
    config = write_config(graphsync_config, fake_graph, tmp_path / "out", names, jobs)

    result = run_graphsync("sync", "--config", str(config), timeout=120)

    assert result.returncode == 0, result.stderr[-3000:]
    assert [fake_graph.max_concurrent_requests(tenant) for tenant in names] == [2, 2, 2], "[run] per_tenant = 2"
    assert fake_graph.max_concurrent_requests() > 2, "tenants ran side by side"

    fake_graph.reset_records()
    serial = run_graphsync("sync", "--parallel", "1", "--config", str(config), timeout=120)

    assert serial.returncode == 0, serial.stderr[-3000:]
    assert fake_graph.max_concurrent_requests() == 1
    in_order = [(tenant, job) for tenant, job, _ in run_starts(serial.stderr)]
    assert in_order == [(tenant, j["name"]) for j in jobs for tenant in names], "job by job, tenant by tenant"


def test_parallel_must_be_a_whole_number_from_1_to_64(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, tmp_path: Path
) -> None:
    config = write_config(graphsync_config, fake_graph, tmp_path / "out", tenants(1), [job("users")])
    for value in ("0", "65", "many"):
        result = run_graphsync("sync", "--parallel", value, "--config", str(config))
        assert result.returncode == 2, result.stderr
        assert "--parallel: expected a whole number from 1 to 64" in result.stderr
    assert not fake_graph.requests
