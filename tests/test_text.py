from graphsync.text import first_line
from graphsync.timestamps import display_utc, epoch, file_stamp, iso_utc

MOMENT = 1796166845.001  # 2026-12-01T23:14:05.001Z


def test_first_line_keeps_one_bounded_line() -> None:
    assert first_line("Bad request\n<html>...</html>") == "Bad request"
    assert first_line("x" * 400) == "x" * 300
    assert first_line("abcdef", limit=3) == "abc"
    assert first_line("") == ""


def test_timestamps_are_utc_in_each_written_form() -> None:
    assert iso_utc(MOMENT) == "2026-12-01T23:14:05Z"
    assert iso_utc(MOMENT, timespec="milliseconds") == "2026-12-01T23:14:05.001Z"
    assert file_stamp(MOMENT) == "20261201T231405Z"
    assert display_utc(MOMENT) == "2026-12-01 23:14:05Z"
    assert epoch("2026-12-01T23:14:05Z") == int(MOMENT)
