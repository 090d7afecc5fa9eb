"""What an operator sees on a terminal: sync progress, the summary table, the status report (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from graphsync.jobs import RunResult
from graphsync.timestamps import display_utc


class SyncProgress:
    """One progress line per (tenant, job): pages and records so far. Silent when not on a terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._tasks: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> SyncProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def begin(self, tenant: str, job: str) -> None:
        self._tasks[tenant, job] = self._progress.add_task(f"{tenant} / {job}", total=None, detail="starting")

    def update(self, tenant: str, job: str, pages: int, records: int) -> None:
        self._progress.update(self._tasks[tenant, job], detail=f"{pages} pages, {records} records")

    def end(self, tenant: str, job: str, status: str) -> None:
        self._progress.update(
            self._tasks[tenant, job],
            total=1,
            completed=1,
            detail=self._progress.tasks[-1].fields["detail"] + f" — {status}",
        )


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


def _snapshot_size(job: dict[str, Any]) -> str:
    if job.get("snapshot_bytes") is None:
        return "-"
    return f"{job['snapshot_bytes'] / 1_000_000:.1f} MB in {job['snapshot_chunks']} chunks"
