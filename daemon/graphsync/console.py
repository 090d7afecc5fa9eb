"""What an operator sees on a terminal: sync progress, the summary table, the status report (rich)."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from graphsync.jobs import RunResult
from graphsync.timestamps import display_utc


class SyncProgress:
    """On a terminal: a line per run in flight (pages and records so far), one line for the whole invocation (runs
    done and in flight), and each finished run printed above them, where it stays. Silent off a terminal.

    Runs report from their worker threads, hence the lock around the task table.
    """

    def __init__(self, *, enabled: bool, total: int) -> None:
        self._enabled = enabled
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._details: dict[tuple[str, str], str] = {}  # what each run's line says now
        self._total = total
        self._done = 0
        self._overall = self._progress.add_task("graphsync sync", total=total, detail=self._count())

    def __enter__(self) -> SyncProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def _count(self) -> str:
        return f"{self._done} of {self._total} runs done, {len(self._tasks)} in flight"

    def begin(self, tenant: str, job: str) -> None:
        with self._lock:
            self._details[tenant, job] = "starting"
            self._tasks[tenant, job] = self._progress.add_task(f"{tenant} / {job}", total=None, detail="starting")
            self._progress.update(self._overall, detail=self._count())

    def update(self, tenant: str, job: str, pages: int, records: int) -> None:
        with self._lock:
            self._details[tenant, job] = f"{pages} pages, {records} records"
            self._progress.update(self._tasks[tenant, job], detail=self._details[tenant, job])

    def end(self, tenant: str, job: str, status: str) -> None:
        with self._lock:
            self._progress.remove_task(self._tasks.pop((tenant, job)))
            detail = self._details.pop((tenant, job))
            self._done += 1
            self._progress.update(self._overall, completed=self._done, detail=self._count())
            if self._enabled:
                self._progress.console.print(f"{tenant} / {job}: {detail} — {status}", markup=False, highlight=False)


def print_summary(results: list[RunResult], *, terminal: bool) -> None:
    """A table on a terminal; otherwise one tab-separated line per run, which logs and scripts read better."""
    columns = ("tenant", "job", "objects", "changes", "duration", "result")
    rows = [
        (
            r.tenant,
            r.job,
            str(r.objects),
            str(r.changes),
            f"{r.duration:.1f} s",
            r.status + (" (full resync)" if r.resync else "") + (f": {r.message}" if r.message else ""),
        )
        for r in results
    ]
    if not terminal:
        for row in (columns, *rows):
            print("\t".join(row))
        return
    table = Table(title="graphsync sync")
    for column in columns:
        table.add_column(column, justify="right" if column in ("objects", "changes", "duration") else "left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def print_status(report: dict[str, Any]) -> None:
    console = Console(soft_wrap=True)
    tokens = Table(title="token cache")
    for column in ("tenant", "blob", "age", "tokens", "expires", "problem"):
        tokens.add_column(column)
    for t in report["tenants"]:
        age = t.get("blob_age_seconds")
        tokens.add_row(
            t["tenant"],
            t["blob"],
            "-" if age is None else f"{age} s",
            str(t.get("tokens", "-")),
            display_utc(t["token_expires_on"]) if t.get("token_expires_on") else "-",
            t.get("problem") or "",
        )
    console.print(tokens)
    jobs = Table(title=f"jobs → {report['output']}")
    columns = (
        "tenant",
        "job",
        "last success",
        "last error",
        "objects",
        "snapshot",
        "warm here",
        "next due",
        "lock holder",
    )
    for column in columns:
        jobs.add_column(column)
    for j in report["jobs"]:
        error = (j["last_error"] or "") + "".join(f"\n⚠ {w}" for w in j["warnings"])
        jobs.add_row(
            j["tenant"],
            j["job"],
            j["last_success"] or "never",
            error,
            str(j["objects"] or "-"),
            _snapshot_size(j),
            "yes" if j["warm_store_here"] else "no",
            j["next_due"] or "-",
            j["lock_holder"] or "-",
        )
    console.print(jobs)
    if report.get("subscriptions"):
        console.print(_subscriptions(report["subscriptions"]))
    if "tables" in report:
        _print_tables(console, report["tables"])


def _subscriptions(lines: list[dict[str, Any]]) -> Table:
    table = Table(title="change notification subscriptions")
    for column in ("tenant", "job", "resource", "expires", "last notification", "maintained", "error"):
        table.add_column(column)
    for s in lines:
        maintained = f"{s['maintained_at']} by {s['maintained_by']}" if s.get("maintained_at") else "-"
        table.add_row(
            s["tenant"],
            s.get("job") or "-",
            s.get("resource") or "-",
            s.get("expires") or "-",
            s.get("last_notification") or "never",
            maintained,
            (s.get("error") or "") + "".join(f"\n⚠ {w}" for w in s.get("warnings", [])),
        )
    return table


def _print_tables(console: Console, tables: dict[str, Any]) -> None:
    """Each table's version, last commit and rows per tenant (from the Delta log, no data read)."""
    grid = Table(title=f"tables → {tables['root']}")
    for column in ("table", "version", "last commit", "files", "rows per tenant"):
        grid.add_column(column)
    for t in tables["tables"]:
        rows = ", ".join(f"{tenant}: {count}" for tenant, count in t["rows"].items())
        grid.add_row(
            t["table"],
            "not created yet" if t["version"] is None else str(t["version"]),
            t["last_commit"] or "-",
            str(t["files"]),
            t.get("problem") or rows or "-",
        )
    console.print(grid)


def _snapshot_size(job: dict[str, Any]) -> str:
    if job.get("snapshot_bytes") is None:
        return "-"
    return f"{job['snapshot_bytes'] / 1_000_000:.1f} MB in {job['snapshot_chunks']} chunks"
