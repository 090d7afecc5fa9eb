"""Small text helpers for messages an operator reads."""

from __future__ import annotations


def first_line(text: str, limit: int = 300) -> str:
    """The first line of ``text``, at most ``limit`` characters ("" for empty text).

    Errors from services and libraries can carry a whole HTML page or a traceback; one bounded line names the cause
    in a log line or a status table without flooding it.
    """
    lines = text.splitlines()
    return lines[0][:limit] if lines else ""
