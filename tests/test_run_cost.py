"""What one run costs in storage calls when it finds nothing new, is already served, or is busy elsewhere.

Counted in this process from every request the Azure SDK sends (a raw request hook on each client), with the
job's output in a blob container, so that the README's statement of a run's cost stays true.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from azure.storage.blob import BlobLeaseClient, ContainerClient
from prometheus_client import REGISTRY

from graphsync.config import JobSettings, load_settings
from graphsync.graph import GraphClient
from graphsync.jobs import JobRunner, RunResult, lock_blob
from graphsync.sinks import BlobSink
from graphsync.storage import BlobStore
from graphsync.tokencache import TokenCaches
from graphsync.workstore import WorkStores
from tests.fakes.graph import FakeGraph, mutate, populate

if TYPE_CHECKING:
    from azure.core.pipeline import PipelineRequest

    from tests.conftest import Azurite, WriteConfig

TENANT = "contoso.onmicrosoft.com"


@dataclass
class Calls:
    """Storage requests as ``VERB blob[?comp=...]``, in order."""

    seen: list[str] = field(default_factory=list)

    def __call__(self, request: PipelineRequest[Any]) -> None:
        http = request.http_request
        url = urlsplit(http.url)
        blob = unquote(url.path).split("/", 3)[-1]
        comp = parse_qs(url.query).get("comp", [""])[0]
        action = http.headers.get("x-ms-lease-action", "")
        self.seen.append(f"{http.method} {blob}" + (f"?comp={comp}" if comp else "") + (f" {action}" if action else ""))


@dataclass
class Fleet:
    job: JobSettings
    calls: Calls
    replicas: dict[str, JobRunner]  # two hosts, each with its own working stores
    container: ContainerClient

    def run(self, replica: str = "a", **options: Any) -> tuple[RunResult, list[str]]:
        """One run on ``replica``, and the storage requests it made."""
        mark = len(self.calls.seen)
        result = self.replicas[replica].run(self.job, TENANT, **options)
        return result, self.calls.seen[mark:]


@pytest.fixture
def fleet(graphsync_config: WriteConfig, fake_graph: FakeGraph, azurite: Azurite, tmp_path: Path) -> Fleet:
    populate(fake_graph, TENANT, users=300, groups=0)
    job = {"name": "users", "resource": "users", "delta": True, "select": ["displayName", "mail"], "every": "15m"}
    exports = f"exports-{uuid.uuid4().hex[:8]}"  # Azurite is shared by the session: a container of its own
    config = graphsync_config(
        extra={"graph": {"endpoint": fake_graph.base_url}, "output": {"container": exports}, "jobs": [job]}
    )
    settings = load_settings(config)
    calls = Calls()

    def store(container: str) -> BlobStore:
        client = ContainerClient.from_connection_string(azurite.connection_string, container, raw_request_hook=calls)
        return BlobStore(client)

    locks = store(settings.storage.container)
    graph = GraphClient(settings.graph.endpoint, "v1.0", TokenCaches.from_settings(settings, locks))
    runners = {
        name: JobRunner(
            graph=graph, sink=BlobSink(store(exports)), locks=locks, stores=WorkStores(tmp_path / name), replica=name
        )
        for name in ("a", "b")
    }
    plain = ContainerClient.from_connection_string(azurite.connection_string, settings.storage.container)
    return Fleet(settings.jobs[0], calls, runners, plain)


def test_a_run_that_finds_nothing_new_costs_five_storage_calls(fleet: Fleet, fake_graph: FakeGraph) -> None:
    first, calls = fleet.run()
    assert first.status == "ok" and first.objects == 300
    assert "PUT locks/contoso.onmicrosoft.com/users.lock?comp=metadata" in calls, "the lock names its holder"
    mutate(fake_graph, TENANT, random.Random(1), changes=3)
    second, _ = fleet.run()
    assert second.status == "ok" and second.changes > 0  # the store is warm from here on

    result, calls = fleet.run()

    assert result.status == "ok" and result.changes == 0 and result.runner == "a"
    # The lock blob still names "a" from its first run: the last runner does not name itself again.
    assert calls == [
        "PUT locks/contoso.onmicrosoft.com/users.lock?comp=lease acquire",  # the job lock
        "GET contoso.onmicrosoft.com/users/state.json",  # cursor and last success
        "HEAD contoso.onmicrosoft.com/users/snapshot.jsonl",  # the published version: the store is warm
        "PUT contoso.onmicrosoft.com/users/state.json",  # the success and the new delta link
        "PUT locks/contoso.onmicrosoft.com/users.lock?comp=lease release",
    ]


def test_a_replica_names_itself_on_the_lock_again_after_another_replica_ran_the_job(fleet: Fleet) -> None:
    naming = "PUT locks/contoso.onmicrosoft.com/users.lock?comp=metadata"
    assert naming in fleet.run("a")[1]
    assert naming in fleet.run("b")[1]
    assert naming in fleet.run("a")[1]
    assert naming not in fleet.run("a")[1]


def runs_counted(result: str) -> float:
    labels = {"tenant": TENANT, "job": "users", "result": result}
    return REGISTRY.get_sample_value("graphsync_job_runs_total", labels) or 0.0


def test_a_served_slot_costs_three_calls_under_the_lease_and_one_with_peek(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ran, _ = fleet.run()
    assert ran.status == "ok"
    slot = time.time() - 60
    counted = runs_counted("skipped")

    skipped, calls = fleet.run(due_after=slot)
    assert (skipped.status, skipped.runner) == ("skipped", "a")
    assert skipped.message.startswith("already ran at ") and skipped.message.endswith(" on a")
    assert calls == [
        "PUT locks/contoso.onmicrosoft.com/users.lock?comp=lease acquire",
        "GET contoso.onmicrosoft.com/users/state.json",
        "PUT locks/contoso.onmicrosoft.com/users.lock?comp=lease release",
    ]

    peeked, calls = fleet.run(due_after=slot, peek=True)
    assert (peeked.status, peeked.runner) == ("skipped", "a")
    assert calls == ["GET contoso.onmicrosoft.com/users/state.json"]
    assert runs_counted("skipped") == counted + 2
    said = [r for r in caplog.records if " skipped: already ran at " in r.getMessage()]
    assert len(said) == 2 and all(r.levelname == "INFO" and r.getMessage().endswith(" on a") for r in said)


def test_a_busy_job_costs_two_calls_and_names_the_holder(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert fleet.run()[0].status == "ok"
    counted = runs_counted("busy")
    lock = fleet.container.get_blob_client(lock_blob(TENANT, "users"))
    lease = BlobLeaseClient(lock)
    lease.acquire(lease_duration=15)
    lock.set_blob_metadata({"holder": "replica-b"}, lease=lease)
    try:
        busy, calls = fleet.run()
    finally:
        lease.release()

    assert (busy.status, busy.runner, busy.message) == ("busy", "replica-b", "running on another replica (replica-b)")
    assert calls == [
        "PUT locks/contoso.onmicrosoft.com/users.lock?comp=lease acquire",
        "HEAD locks/contoso.onmicrosoft.com/users.lock",
    ]
    assert runs_counted("busy") == counted + 1
    [said] = [r for r in caplog.records if " busy: " in r.getMessage()]
    assert said.levelname == "INFO" and said.getMessage().endswith("running on another replica (replica-b)")


def test_a_run_handed_out_as_the_stop_came_takes_no_lease_and_starts_nothing(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    stop = threading.Event()
    stop.set()  # SIGTERM arrived between the pool handing out the try and the run
    caplog.set_level(logging.INFO)
    result, calls = fleet.run(stop=stop)
    assert result.status == "stopped" and calls == [], f"{result.status}: {calls}"
    assert not [r for r in caplog.records if str(r.msg).startswith("run %s of job")], "no run was started"
