"""The few ways graphsync writes a moment, all in UTC so that replicas in different zones agree on every line.

``iso_utc`` is for what machines read (state files, JSON logs), ``file_stamp`` for names that sort by time, and
``display_utc`` for what an operator reads on a terminal. Graph's own timestamps have 100-ns precision (seven
fractional digits), one digit more than Python's ``datetime``: :func:`graph_ticks` and :func:`graph_time` keep them
exact, as whole ticks, where a comparison with Graph's must agree to the tick (a log's time cursor).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

TICKS_PER_SECOND = 10_000_000  # Graph's DateTimeOffset precision: 100 ns
_GRAPH_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)


def iso_utc(seconds: float, *, timespec: Literal["seconds", "milliseconds"] = "seconds") -> str:
    """ISO-8601 in UTC with a ``Z``: ``2026-12-01T23:14:05Z``, or ``2026-12-01T23:14:05.001Z`` in milliseconds."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def epoch(iso: str) -> float:
    """Unix seconds of an ISO-8601 UTC time such as :func:`iso_utc` writes (a state file's ``last_success``)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def file_stamp(seconds: float) -> str:
    """``20261201T231405Z``: a compact UTC time for file names, which then sort in time order."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%dT%H%M%SZ")


def display_utc(seconds: float) -> str:
    """``2026-12-01 23:14:05Z``: a UTC time for a person reading a terminal."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def graph_ticks(text: str) -> int:
    """100-ns ticks since the epoch of an ISO-8601 time with a zone, as Graph writes them (``...05.1234567Z``).

    Digits beyond the seventh (Graph sends none) round up, so a bound made from the result never excludes the
    record it came from. Raises ValueError for anything else, a time without a zone included.
    """
    match = _GRAPH_TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an ISO-8601 time with a zone")
    zone = "+00:00" if match[3].upper() == "Z" else match[3]
    seconds = int(datetime.fromisoformat(match[1] + zone).timestamp())
    digits = match[2] or ""
    fraction = int(digits[:7].ljust(7, "0"))
    if digits[7:].strip("0"):
        fraction += 1
    return seconds * TICKS_PER_SECOND + fraction


def graph_time(ticks: int) -> str:
    """The ISO-8601 UTC text of 100-ns ``ticks``, with Graph's seven fractional digits (``...00.1234567Z``)."""
    seconds, fraction = divmod(ticks, TICKS_PER_SECOND)
    return f"{datetime.fromtimestamp(seconds, UTC).strftime('%Y-%m-%dT%H:%M:%S')}.{fraction:07d}Z"
