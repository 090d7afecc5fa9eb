"""Log output: one JSON object per line for journald and log shippers, plain text on a terminal.

Both formatters pass their finished line through :func:`graphsync.redaction.redact`, so a secret cannot reach the
output by any path: our messages, a library's debug line, or an exception's traceback. JSON lines carry their
``time`` in UTC (``2026-12-01T23:14:05.001Z``), so that lines from replicas in different zones sort and compare as
they are; the terminal keeps local time for the person reading it.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from graphsync.redaction import redact
from graphsync.timestamps import iso_utc

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JSON_FIELDS = ["asctime", "levelname", "name", "message"]
# Libraries that narrate every HTTP request at INFO; at DEBUG an operator asked for everything.
CHATTY_LIBRARIES = ("azure.core.pipeline.policies.http_logging_policy", "azure.identity", "urllib3", "msal")


class RedactingJsonFormatter(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The ``time`` field: ISO-8601 UTC with milliseconds, whatever the host's time zone."""
        return iso_utc(record.created, timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactingTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def json_formatter() -> RedactingJsonFormatter:
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` and any ``extra=`` fields."""
    return RedactingJsonFormatter(
        JSON_FIELDS,
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        timestamp=False,
    )


def configure_logging(level: str = "INFO", *, json_output: bool | None = None) -> None:
    """Route all logging to stderr at ``level``; JSON unless stderr is a terminal (or ``json_output`` says)."""
    if json_output is None:
        json_output = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(RedactingTextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = logging.WARNING if root.level > logging.DEBUG else logging.DEBUG
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
