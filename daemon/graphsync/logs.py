"""Log output: one JSON object per line for journald and log shippers, plain text on a terminal.

Both formatters pass their finished line through :func:`daemon.redaction.redact`, so a secret cannot reach the
output by any path: our messages, a library's debug line, or an exception's traceback.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from graphsync.redaction import redact

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JSON_FIELDS = ["asctime", "levelname", "name", "message"]
# Libraries that narrate every HTTP request at INFO; at DEBUG an operator asked for everything.
CHATTY_LIBRARIES = ("azure.core.pipeline.policies.http_logging_policy", "azure.identity", "urllib3", "msal")


class RedactingJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactingTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(level: str = "INFO", *, json_output: bool | None = None) -> None:
    """Route all logging to stderr at ``level``; JSON unless stderr is a terminal (or ``json_output`` says)."""
    if json_output is None:
        json_output = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(
            RedactingJsonFormatter(
                JSON_FIELDS,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(RedactingTextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = logging.WARNING if root.level > logging.DEBUG else logging.DEBUG
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
