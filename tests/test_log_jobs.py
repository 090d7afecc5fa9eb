"""Logs read by time (`cursor = "createdDateTime"`) through `graphsync sync`, against the HTTPS fake Graph.

The oracle: across runs, the change files hold every sign-in of the window exactly once, whatever arrives late
(inside the overlap window), whatever the page budget cuts off, and whatever the reporting APIs' throttling
refuses; the cursor in state.json only moves past records that were written.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import test_sync
from tests.fakes.graph import LOG_TIMES, FakeGraph
from tests.test_sync import TENANT, DirectoryOutput, graph_requests, output_text, write_config

if TYPE_CHECKING:
    import subprocess

    from tests.conftest import RunGraphsync, WriteConfig

out_dir = test_sync.out_dir  # test_sync's fixture, bound here so that pytest finds it for this module too

SIGN_INS = "auditLogs/signIns"
JOB = {"name": "sign-ins", "resource": SIGN_INS, "cursor": "createdDateTime", "overlap": "1h", "every": "5m"}
MINUTE = 60.0


class SignIns:
    """Makes log records (sign-ins unless told) at times relative to the start of the test, and runs the job."""

    def __init__(self, fake: FakeGraph, run: RunGraphsync, config: Path, out_dir: Path, resource: str) -> None:
        self.fake, self.run, self.config, self.resource = fake, run, config, resource
        self.output = DirectoryOutput(out_dir)
        self.now = time.time()
        self.serial = 0

    def add(self, *minutes_ago: float) -> list[str]:
        """One record per value, that many minutes before the test started; returns their ids."""
        records = []
        for minutes in minutes_ago:
            self.serial += 1
            at = datetime.fromtimestamp(self.now - minutes * MINUTE, UTC)
            records.append(
                {
                    "id": f"sign-in-{self.serial:05d}",
                    LOG_TIMES[self.resource]: at.strftime("%Y-%m-%dT%H:%M:%S.%f0Z"),  # Graph's 7 fractional digits
                    "userPrincipalName": f"user{self.serial % 7}@contoso.com",
                    "status": {"errorCode": 0, "failureReason": None},
                }
            )
        self.fake.add_log_records(TENANT, self.resource, records)
        return [record["id"] for record in records]

    def sync(self) -> subprocess.CompletedProcess[str]:
        result = self.run("sync", "--config", str(self.config))
        assert result.returncode == 0 and "Traceback" not in result.stderr, output_text(result)
        return result

    def written(self) -> Counter[str]:
        """How many times each id was written, over every change file."""
        files = self.output.change_files("sign-ins")
        assert all(not name.endswith("-full.jsonl") for name in files), "a log has no full rounds"
        return Counter(json.loads(line)["id"] for data in files.values() for line in data.splitlines())

    def state(self) -> dict[str, Any]:
        state = self.output.state("sign-ins")
        assert state is not None and state["last_error"] is None
        return state


def make_sign_ins(
    graphsync_config: WriteConfig, fake: FakeGraph, run: RunGraphsync, out_dir: Path, **job: Any
) -> SignIns:
    job = {**JOB, **job}
    config = write_config(graphsync_config, fake, jobs=[job], output={"directory": str(out_dir)})
    return SignIns(fake, run, config, out_dir, job["resource"])


def test_a_sign_in_job_over_three_runs_writes_each_record_once_late_arrivals_included(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, out_dir: Path
) -> None:
    logs = make_sign_ins(graphsync_config, fake_graph, run_graphsync, out_dir)
    fake_graph.page_size = 25
    too_old = logs.add(8 * 24 * 60, 10 * 24 * 60)  # before `since` (7 days): never read
    expected = logs.add(*[120 + 30 * n for n in range(120)])  # the last 2 to 62 hours

    logs.sync()
    assert logs.written() == Counter(expected)
    assert not (out_dir / TENANT / "sign-ins" / "snapshot.jsonl").exists(), "change files only"
    cursor = logs.state()["cursor"]
    assert cursor["time"].startswith(datetime.fromtimestamp(logs.now - 120 * MINUTE, UTC).strftime("%Y-%m-%dT%H:%M"))
    assert cursor["backlog"] is None

    for late, new in (((50, 40, 30, 20, 5), range(1, 100, 3)), ((55, 10), range(1, 30))):
        # `late`: minutes behind the cursor, inside the hour of overlap; `new`: after the cursor
        cursor_minutes_ago = (logs.now - datetime.fromisoformat(logs.state()["cursor"]["time"]).timestamp()) / MINUTE
        before = len(expected)
        expected += logs.add(*(cursor_minutes_ago + minutes for minutes in late))
        expected += logs.add(*(minutes for minutes in new if minutes < cursor_minutes_ago))
        mark = len(fake_graph.requests)
        logs.sync()
        assert logs.written() == Counter(expected), "each record exactly once"
        assert logs.state()["changes"] == len(expected) - before
        query = graph_requests(fake_graph, mark)[0].query["$filter"]
        lower = datetime.fromisoformat(query.removeprefix("createdDateTime ge ")).timestamp()
        assert abs(lower - (logs.now - (cursor_minutes_ago + 60) * MINUTE)) < 1, "the window reaches back an hour"
    assert not set(too_old) & set(logs.written())
    seen = logs.state()["cursor"]["seen"]
    assert seen and set(seen) <= set(expected[-40:]), "only ids of the last hour of overlap are remembered"


def test_a_sign_in_job_honours_retry_after_and_its_page_budget(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, out_dir: Path
) -> None:
    logs = make_sign_ins(graphsync_config, fake_graph, run_graphsync, out_dir, max_pages=3)
    fake_graph.page_size = 10
    fake_graph.reports_limit = (2, 2.0)  # the reporting APIs' kind of limit, scaled down
    expected = logs.add(*[30 + 7 * n for n in range(45)])

    first = logs.sync()
    written = logs.written()
    assert sum(written.values()) == 30 and set(written) == set(expected[:30]), "the newest 30: three pages"
    backlog = logs.state()["cursor"]["backlog"]
    assert backlog is not None and logs.state()["cursor"]["time"] is None
    assert "Graph answered 429" in first.stderr, output_text(first)

    mark = len(fake_graph.requests)
    logs.sync()  # the backlog: the 15 older ones, and the window is complete
    window = graph_requests(fake_graph, mark)[0].query["$filter"]
    assert window.endswith(f" and createdDateTime le {backlog['until']}"), window
    assert logs.written() == Counter(expected)
    cursor = logs.state()["cursor"]
    assert cursor["backlog"] is None and cursor["time"] == backlog["top"]

    expected += logs.add(5, 4, 3)
    logs.sync()
    assert logs.written() == Counter(expected)

    requests = [r for r in graph_requests(fake_graph) if r.path == f"/v1.0/{SIGN_INS}"]
    throttled = [index for index, request in enumerate(requests) if request.status == 429]
    assert throttled, "the reporting limit was reached"
    for index in throttled:
        retry = requests[index + 1]
        assert retry.query == requests[index].query, "the same page again"
        assert retry.time - requests[index].time >= 1.0, "retried no sooner than Retry-After (at least 1 s)"


def test_changing_select_of_a_log_job_does_not_write_records_twice(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, out_dir: Path
) -> None:
    logs = make_sign_ins(graphsync_config, fake_graph, run_graphsync, out_dir)
    expected = logs.add(*[120 + 30 * n for n in range(20)])
    logs.sync()
    assert logs.written() == Counter(expected)

    # The operator adds a property to the export: the cursor goes on where it stood.
    logs.config = write_config(
        graphsync_config,
        fake_graph,
        jobs=[{**JOB, "select": ["id", "createdDateTime", "userPrincipalName"]}],
        output={"directory": str(out_dir)},
    )
    expected += logs.add(10)
    logs.sync()
    assert logs.written() == Counter(expected), logs.written().most_common(3)


def test_a_log_job_whose_select_omits_the_time_property_still_reads_by_it(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, out_dir: Path
) -> None:
    logs = make_sign_ins(graphsync_config, fake_graph, run_graphsync, out_dir, select=["userPrincipalName"])
    expected = logs.add(30, 20, 10)
    mark = len(fake_graph.requests)
    logs.sync()
    assert logs.written() == Counter(expected)
    assert graph_requests(fake_graph, mark)[0].query["$select"] == "userPrincipalName,id,createdDateTime"


def test_a_first_run_backlog_is_read_to_its_end_even_when_the_runs_are_minutes_apart(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, out_dir: Path
) -> None:
    logs = make_sign_ins(graphsync_config, fake_graph, run_graphsync, out_dir, since="20s", max_pages=2)
    fake_graph.page_size = 1
    expected = logs.add(15 / 60, 10 / 60, 5 / 60)  # 15, 10 and 5 seconds before the test started
    logs.sync()  # reads the newest two; the oldest is the backlog
    assert logs.state()["cursor"]["backlog"] is not None
    time.sleep(max(0.0, logs.now + 12 - time.time()))  # `since` back from now no longer reaches the oldest
    logs.sync()
    assert logs.written() == Counter(expected)
    assert logs.state()["cursor"]["backlog"] is None


def test_a_backlog_boundary_inside_one_microsecond_loses_no_record(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, run_graphsync: RunGraphsync, out_dir: Path
) -> None:
    """Graph compares its timestamps to the 100-ns tick (so does the fake): a bound cut to microseconds would
    leave out the record 400 ns older than the one it was taken from."""
    logs = make_sign_ins(graphsync_config, fake_graph, run_graphsync, out_dir, max_pages=2)
    fake_graph.page_size = 1
    newest = logs.add(5)
    second = datetime.fromtimestamp(int(logs.now) - 600, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    records = [
        {"id": "newer", "createdDateTime": f"{second}.1234567Z"},
        {"id": "older", "createdDateTime": f"{second}.1234563Z"},  # the same microsecond, 400 ns earlier
    ]
    fake_graph.add_log_records(TENANT, SIGN_INS, records)
    logs.sync()  # the newest and "newer": the backlog ends at "newer"
    assert logs.state()["cursor"]["backlog"]["until"] == f"{second}.1234567Z"
    logs.sync()
    assert logs.written() == Counter([*newest, "newer", "older"])


@pytest.mark.parametrize(
    ("resource", "lower", "upper"),
    [("auditLogs/directoryAudits", " ge ", " le "), ("auditLogs/provisioning", " gt ", " lt ")],
)
def test_audit_logs_are_asked_newest_first_with_the_filter_operators_graph_documents_for_them(
    graphsync_config: WriteConfig,
    fake_graph: FakeGraph,
    run_graphsync: RunGraphsync,
    out_dir: Path,
    resource: str,
    lower: str,
    upper: str,
) -> None:
    """Neither log documents its order (the fake serves them oldest first): a page budget is only safe when the
    run asks for newest first; provisioning takes only gt/lt, exactly equivalent one tick outside."""
    cursor = LOG_TIMES[resource]
    logs = make_sign_ins(graphsync_config, fake_graph, run_graphsync, out_dir, resource=resource, cursor=cursor)
    logs.config = write_config(
        graphsync_config,
        fake_graph,
        jobs=[{**JOB, "resource": resource, "cursor": cursor, "max_pages": 2}],
        output={"directory": str(out_dir)},
    )
    fake_graph.page_size = 5
    expected = logs.add(*[30 + 7 * n for n in range(23)])
    mark = len(fake_graph.requests)
    for _ in range(3):  # 10, 10 and the last 3 of the backlog
        logs.sync()
    assert logs.written() == Counter(expected)
    first, *_, backlog = [r for r in graph_requests(fake_graph, mark) if "$skiptoken" not in r.query]
    assert first.query["$orderby"] == f"{cursor} desc"
    assert lower in first.query["$filter"] and upper in backlog.query["$filter"], backlog.query
    expected += logs.add(5, 4)
    logs.sync()
    assert logs.written() == Counter(expected)
