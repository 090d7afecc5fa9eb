"""The JSON log line an operator's log shipper reads."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

import pytest

from graphsync.logs import json_formatter

# 2026-12-01T23:14:05.001Z, which is already 2 December in Tokyo (UTC+9).
MOMENT = 1796166845.001


@pytest.fixture
def tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the test with the process's local time zone set to Asia/Tokyo, then restore it."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _line(created: float, message: str = "synced") -> dict[str, object]:
    record = logging.LogRecord("graphsync.jobs", logging.INFO, __file__, 1, message, None, None)
    record.created = created
    return json.loads(json_formatter().format(record))


def test_json_time_is_utc_iso_8601_with_milliseconds_whatever_the_host_zone(tokyo: None) -> None:
    assert os.environ["TZ"] == "Asia/Tokyo" and time.localtime(MOMENT).tm_mday == 2  # the zone is in effect
    line = _line(MOMENT)
    assert line["time"] == "2026-12-01T23:14:05.001Z"
    assert line == {
        "time": "2026-12-01T23:14:05.001Z",
        "level": "INFO",
        "logger": "graphsync.jobs",
        "message": "synced",
    }


def test_json_time_keeps_three_digits_on_a_whole_second() -> None:
    assert _line(1796166845.0)["time"] == "2026-12-01T23:14:05.000Z"
