"""The few ways graphsync writes a moment, all in UTC so that replicas in different zones agree on every line.

``iso_utc`` is for what machines read (state files, JSON logs), ``file_stamp`` for names that sort by time, and
``display_utc`` for what an operator reads on a terminal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal


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
