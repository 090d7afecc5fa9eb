"""Logs read by time (sign-ins, directory audits, provisioning): a time cursor instead of a delta link.

Graph serves these logs without delta: filtered by their timestamp, under throttling limits far below the
directory's (5 requests per 10 seconds per app and tenant; ``Retry-After`` is honoured by the Graph client). A run
reads the window from ``overlap`` behind its cursor (``since`` back on the first run) and writes the records it has
not written before to a change file; a log has no state to snapshot. Records arrive late (the reporting pipeline's
latency), which is why every window reaches back by ``overlap``; the ids already written in that stretch are
remembered, so each record is written once. With tables on, the records written go to the log's append-only table
too (:meth:`graphsync.tables.RoundTables.append`, which adds only ids it lacks), before the caller saves the cursor.

A run reads at most ``max_pages`` pages, newest first (asked for with ``$orderby`` on the logs that document it).
A run that stops there has written the newest part of its window; the older rest is the *backlog*: the next runs
read ``[lower, until]`` (``lower``: the window's start, kept; ``until``: the oldest record read so far) until they
reach its end, and only then does the cursor move, to the newest record of the window. So the cursor never passes
a record that was not written, however far behind a job is. (Should more records share one timestamp than
``max_pages`` pages hold, a backlog cannot get past them: the run says so in a warning; raise ``max_pages``.)

Times are Graph's own, to the 100-ns tick (:func:`graphsync.timestamps.graph_ticks`): a bound rounded to Python's
microseconds could exclude the very record it came from. Logs whose filter Graph documents with ``gt``/``lt`` only
get the exactly equivalent strict bounds, one tick outside.

The cursor belongs to the resource and its time property: changing ``select`` changes what later records carry,
not which were written. ``id`` and the time property are always selected, since de-duplication and the cursor
read them. ``state.json`` keeps it as
``"cursor": {"time": ..., "seen": {id: time}, "backlog": {"until": ..., "top": ..., "lower": ...}}``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graphsync.config.jobkinds import LOG_CURSORS, STRICT_TIME_FILTERS
from graphsync.graph import GraphClient, MalformedResponse
from graphsync.rounds import Progress, RunInterrupted
from graphsync.schedule import interval_seconds
from graphsync.sinks import Sink
from graphsync.snapshot import encode
from graphsync.tables import NO_TABLES, LogRecords, RoundTables
from graphsync.timestamps import TICKS_PER_SECOND, graph_ticks, graph_time

if TYPE_CHECKING:
    from graphsync.config import JobSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backlog:
    """The older part of a window a run could not finish: read ``[lower, until]`` next; ``top`` ends the window.

    Times in 100-ns ticks. ``lower`` is ``None`` only in a cursor saved before it was kept.
    """

    until: int
    top: int
    lower: int | None = None


@dataclass
class LogCursor:
    """Where a log job stands: complete through ``time``, the ids written near it, and any backlog (100-ns ticks)."""

    time: int | None = None
    seen: dict[str, int] = field(default_factory=dict)
    backlog: Backlog | None = None

    @classmethod
    def from_state(cls, value: Any) -> LogCursor:
        """The cursor saved in state.json; an unreadable one starts over (a first run: ``since`` back)."""
        if value is None:
            return cls()
        try:
            backlog = value.get("backlog")
            return cls(
                time=graph_ticks(value["time"]) if value.get("time") else None,
                seen={record_id: graph_ticks(at) for record_id, at in value["seen"].items()},
                backlog=Backlog(
                    graph_ticks(backlog["until"]),
                    graph_ticks(backlog["top"]),
                    graph_ticks(backlog["lower"]) if backlog.get("lower") else None,
                )
                if backlog
                else None,
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            log.warning("the saved log cursor is unreadable; starting over from `since`")
            return cls()

    def as_state(self) -> dict[str, Any]:
        backlog = self.backlog
        return {
            "time": graph_time(self.time) if self.time is not None else None,
            "seen": {record_id: graph_time(at) for record_id, at in sorted(self.seen.items())},
            "backlog": {
                "until": graph_time(backlog.until),
                "top": graph_time(backlog.top),
                "lower": graph_time(backlog.lower) if backlog.lower is not None else None,
            }
            if backlog
            else None,
        }


@dataclass
class LogRound:
    """What a log run did."""

    cursor: LogCursor
    written: int = 0
    duplicates: int = 0  # records read again (the overlap, a backlog's boundary) and not written twice
    pages: int = 0
    complete: bool = False


def cursor_applies(saved_query: Any, job: JobSettings) -> bool:
    """Whether the cursor in a state saved with ``saved_query`` (its ``"query"``) is a cursor for ``job``."""
    return (
        isinstance(saved_query, dict)
        and saved_query.get("resource") == job.resource
        and saved_query.get("cursor") == job.cursor
    )


def log_select(job: JobSettings) -> list[str] | None:
    """The job's ``select`` with ``id`` and the cursor property added: de-duplication and the cursor read them."""
    if not job.select:
        return None
    assert job.cursor is not None
    return list(dict.fromkeys([*job.select, "id", job.cursor]))


def time_window(resource: str, cursor: str, lower: int, until: int | None) -> str:
    """The ``$filter`` for ``[lower, until]`` (ticks), in the operators Graph documents for ``resource``'s time.

    ``gt``/``lt`` one tick outside is exactly ``ge``/``le`` at Graph's 100-ns precision.
    """
    if resource in STRICT_TIME_FILTERS:
        window = f"{cursor} gt {graph_time(lower - 1)}"
        return window if until is None else f"{window} and {cursor} lt {graph_time(until + 1)}"
    window = f"{cursor} ge {graph_time(lower)}"
    return window if until is None else f"{window} and {cursor} le {graph_time(until)}"


class LogRoundRunner:
    """Runs log rounds for one output."""

    def __init__(self, *, graph: GraphClient, sink: Sink, tables: RoundTables = NO_TABLES) -> None:
        self._graph = graph
        self._sink = sink
        self._tables = tables

    def run(
        self,
        job: JobSettings,
        tenant: str,
        state: dict[str, Any],
        change_file: Callable[[bool], str],
        *,
        now: float,
        interrupted: Callable[[], bool],
        progress: Progress | None = None,
    ) -> LogRound:
        """One run from ``state`` (the job's ``state.json``); the change file is written before the caller saves
        the cursor, so a crash in between writes some records twice at worst, never loses one."""
        assert job.cursor is not None
        previous = LogCursor.from_state(state.get("cursor")) if cursor_applies(state.get("query"), job) else LogCursor()
        overlap = interval_seconds(job.overlap) * TICKS_PER_SECOND
        if previous.backlog is not None and previous.backlog.lower is not None:
            lower = previous.backlog.lower  # the window a backlog finishes keeps its start
        elif previous.time is not None:
            lower = previous.time - overlap
        else:
            lower = int((now - interval_seconds(job.since)) * TICKS_PER_SECOND)
        until = previous.backlog.until if previous.backlog is not None else None
        url = self._graph.collection_url(
            job.resource,
            select=log_select(job),
            filter_expression=time_window(job.resource, job.cursor, lower, until),
            orderby=f"{job.cursor} desc" if job.resource in LOG_CURSORS else None,
        )

        seen = dict(previous.seen)
        oldest: int | None = None
        newest: int | None = None
        done = LogRound(previous)
        with tempfile.TemporaryFile() as changes:
            for page in self._graph.pages(tenant, url):
                done.pages += 1
                for record in page.objects:
                    record_id, at = _identify(record, job.cursor, job.resource)
                    oldest = at if oldest is None else min(oldest, at)
                    newest = at if newest is None else max(newest, at)
                    if record_id in seen:
                        done.duplicates += 1
                        continue
                    seen[record_id] = at
                    changes.write(encode(record))
                    done.written += 1
                if progress:
                    progress(tenant, job.name, done.pages, done.written)
                if page.next_link is None:
                    done.complete = True
                    break
                if done.pages >= job.max_pages:
                    break
                if interrupted():
                    raise RunInterrupted("stopped between pages")
            if done.written:
                changes.seek(0)
                self._sink.write_changes(tenant, job.name, change_file(False), changes)
                changes.seek(0)
                self._tables.append(LogRecords(tenant, job, changes, now))
        done.cursor = _advance(previous, seen, done.complete, oldest, newest, overlap, lower)
        extra = {"tenant": tenant, "job": job.name}
        log.info(
            "%s/%s: %d new records written, %d read again and skipped (overlap)",
            tenant,
            job.name,
            done.written,
            done.duplicates,
            extra=extra,
        )
        if not done.complete and previous.backlog is not None and oldest == previous.backlog.until:
            log.warning(
                "%s/%s: %d pages held only records of %s, where the last run stopped too: more records share that "
                "time than max_pages = %d pages hold, so the backlog cannot get past them; raise max_pages",
                tenant,
                job.name,
                done.pages,
                graph_time(previous.backlog.until),
                job.max_pages,
                extra=extra,
            )
        elif not done.complete:
            log.info(
                "%s/%s: stopped at max_pages = %d; the next run goes on with records up to %s",
                tenant,
                job.name,
                job.max_pages,
                graph_time(done.cursor.backlog.until) if done.cursor.backlog else "-",
                extra=extra,
            )
        return done


def _identify(record: Any, cursor: str, resource: str) -> tuple[str, int]:
    """A record's id and timestamp (ticks): what de-duplication and the cursor rely on."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise MalformedResponse(f"a record in {resource} has no string 'id'")
    try:
        return record["id"], graph_ticks(record[cursor])
    except (KeyError, TypeError, ValueError):
        raise MalformedResponse(f"record {record['id']} in {resource} has no ISO-8601 '{cursor}'") from None


def _advance(
    previous: LogCursor,
    seen: dict[str, int],
    complete: bool,
    oldest: int | None,
    newest: int | None,
    overlap: int,
    lower: int,
) -> LogCursor:
    """The cursor after a run that read the window from ``lower``, records from ``oldest`` to ``newest``, and
    finished its window or not (times in ticks)."""
    if complete:
        ends = [t for t in (previous.time, previous.backlog.top if previous.backlog else None, newest) if t is not None]
        cursor = LogCursor(max(ends) if ends else None)
    else:
        top = previous.backlog.top if previous.backlog else newest
        until = oldest if oldest is not None else (previous.backlog.until if previous.backlog else None)
        backlog = Backlog(until, top, lower) if until is not None and top is not None else previous.backlog
        cursor = LogCursor(previous.time, backlog=backlog)
    cursor.seen = {record_id: at for record_id, at in seen.items() if _may_come_again(at, cursor, overlap)}
    return cursor


def _may_come_again(at: int, cursor: LogCursor, overlap: int) -> bool:
    """Whether a later window can return a record of time ``at`` again, so that its id must be remembered.

    Windows start ``overlap`` behind the cursor; during a backlog they end at ``until``, and the window after it
    starts ``overlap`` behind ``top``. Records between the cursor and ``until`` were read once and never again.
    """
    if cursor.time is not None and at < cursor.time - overlap:
        return False
    if cursor.backlog is None:
        return cursor.time is not None
    before_cursor = cursor.time is not None and at <= cursor.time
    return before_cursor or at == cursor.backlog.until or at >= cursor.backlog.top - overlap
