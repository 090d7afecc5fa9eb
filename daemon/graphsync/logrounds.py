"""Logs read by time (sign-ins, directory audits, provisioning): a time cursor instead of a delta link.

Graph serves these logs without delta: filtered by their timestamp, newest first, under throttling limits far below
the directory's (5 requests per 10 seconds per app and tenant; ``Retry-After`` is honoured by the Graph client). A
run reads the window from ``overlap`` behind its cursor (``since`` back on the first run) and writes the records it
has not written before to a change file; a log has no state to snapshot. Records arrive late (the reporting
pipeline's latency), which is why every window reaches back by ``overlap``; the ids already written in that
stretch are remembered, so each record is written once.

A run reads at most ``max_pages`` pages. Newest first, a run that stops there has written the newest part of its
window; the older rest is the *backlog*: the next runs read ``[lower, until]`` (``until``: the oldest record
read so far) until they reach its end, and only then does the cursor move, to the newest record of the window. So
the cursor never passes a record that was not written, however far behind a job is.

``state.json`` keeps it as ``"cursor": {"time": ..., "seen": {id: time}, "backlog": {"until": ..., "top": ...}}``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from graphsync.graph import GraphClient, MalformedResponse
from graphsync.rounds import Progress, RunInterrupted, saved_query
from graphsync.schedule import interval_seconds
from graphsync.sinks import Sink
from graphsync.snapshot import encode

if TYPE_CHECKING:
    from graphsync.config import JobSettings

log = logging.getLogger(__name__)


def _iso(moment: datetime) -> str:
    """A time as state.json and Graph's ``$filter`` take it: UTC, microseconds, ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str) -> datetime:
    """An ISO-8601 time with a zone (Graph writes 7 fractional digits; Python keeps 6, which only rounds down)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text} has no time zone")
    return moment


@dataclass(frozen=True)
class Backlog:
    """The older part of a window a run could not finish: read ``[lower, until]`` next; ``top`` ends the window."""

    until: datetime
    top: datetime


@dataclass
class LogCursor:
    """Where a log job stands: complete through ``time``, the ids written near it, and any backlog."""

    time: datetime | None = None
    seen: dict[str, datetime] = field(default_factory=dict)
    backlog: Backlog | None = None

    @classmethod
    def from_state(cls, value: Any) -> LogCursor:
        """The cursor saved in state.json; an unreadable one starts over (a first run: ``since`` back)."""
        if value is None:
            return cls()
        try:
            backlog = value.get("backlog")
            return cls(
                time=_parse(value["time"]) if value.get("time") else None,
                seen={record_id: _parse(at) for record_id, at in value["seen"].items()},
                backlog=Backlog(_parse(backlog["until"]), _parse(backlog["top"])) if backlog else None,
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            log.warning("the saved log cursor is unreadable; starting over from `since`")
            return cls()

    def as_state(self) -> dict[str, Any]:
        return {
            "time": _iso(self.time) if self.time else None,
            "seen": {record_id: _iso(at) for record_id, at in sorted(self.seen.items())},
            "backlog": {"until": _iso(self.backlog.until), "top": _iso(self.backlog.top)} if self.backlog else None,
        }


@dataclass
class LogRound:
    """What a log run did."""

    cursor: LogCursor
    written: int = 0
    duplicates: int = 0
    pages: int = 0
    complete: bool = False


class LogRoundRunner:
    """Runs log rounds for one output."""

    def __init__(self, *, graph: GraphClient, sink: Sink) -> None:
        self._graph = graph
        self._sink = sink

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
        previous = LogCursor.from_state(state.get("cursor")) if state.get("query") == saved_query(job) else LogCursor()
        overlap = timedelta(seconds=interval_seconds(job.overlap))
        if previous.time is not None:
            lower = previous.time - overlap
        else:
            lower = datetime.fromtimestamp(now, UTC) - timedelta(seconds=interval_seconds(job.since))
        window = f"{job.cursor} ge {_iso(lower)}"
        if previous.backlog is not None:
            window += f" and {job.cursor} le {_iso(previous.backlog.until)}"
        url = self._graph.collection_url(job.resource, select=job.select, filter_expression=window)

        seen = dict(previous.seen)
        oldest: datetime | None = None
        newest: datetime | None = None
        done = LogRound(previous)
        with tempfile.TemporaryFile() as changes:
            for page in self._graph.pages(tenant, url):
                done.pages += 1
                for record in page.objects:
                    record_id, at = _identify(record, job.cursor, job.resource)
                    oldest, newest = min(oldest or at, at), max(newest or at, at)
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
        done.cursor = _advance(previous, seen, done.complete, oldest, newest, overlap)
        if not done.complete:
            log.info(
                "%s/%s: stopped at max_pages = %d; the next run goes on with records up to %s",
                tenant,
                job.name,
                job.max_pages,
                _iso(done.cursor.backlog.until) if done.cursor.backlog else "-",
                extra={"tenant": tenant, "job": job.name},
            )
        return done


def _identify(record: Any, cursor: str, resource: str) -> tuple[str, datetime]:
    """A record's id and timestamp: what de-duplication and the cursor rely on."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise MalformedResponse(f"a record in {resource} has no string 'id'")
    try:
        return record["id"], _parse(record[cursor])
    except (KeyError, TypeError, ValueError):
        raise MalformedResponse(f"record {record['id']} in {resource} has no ISO-8601 '{cursor}'") from None


def _advance(
    previous: LogCursor,
    seen: dict[str, datetime],
    complete: bool,
    oldest: datetime | None,
    newest: datetime | None,
    overlap: timedelta,
) -> LogCursor:
    """The cursor after a run that read records from ``oldest`` to ``newest`` and finished its window or not."""
    if complete:
        ends = [t for t in (previous.time, previous.backlog.top if previous.backlog else None, newest) if t]
        cursor = LogCursor(max(ends) if ends else None)
    else:
        top = previous.backlog.top if previous.backlog else newest
        until = oldest or (previous.backlog.until if previous.backlog else None)
        cursor = LogCursor(previous.time, backlog=Backlog(until, top) if until and top else previous.backlog)
    cursor.seen = {record_id: at for record_id, at in seen.items() if _may_come_again(at, cursor, overlap)}
    return cursor


def _may_come_again(at: datetime, cursor: LogCursor, overlap: timedelta) -> bool:
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
