"""Fleet-wide slots: pure functions of the schedule, no processes needed."""

from __future__ import annotations

from datetime import UTC, datetime

from daemon.config import JobSettings
from daemon.scheduler import crontab_trigger, first_run, slot_start, trigger


def _job(**schedule: str) -> JobSettings:
    return JobSettings(name="users", resource="users", **schedule)


def test_interval_slots_are_aligned_to_the_epoch_so_every_replica_agrees():
    job = _job(every="15m")
    assert slot_start(job, 1_800_000_123.4) == 1_800_000_000  # 1_800_000_000 is a multiple of 900
    fire = trigger(job).get_next_fire_time(None, datetime.fromtimestamp(1_800_000_123.4, UTC))
    assert fire.timestamp() == 1_800_000_900


def test_first_run_is_soon_unless_the_next_slot_is_near():
    job = _job(every="1h")
    start = 1_800_000_000 - 1_800_000_000 % 3600
    early = first_run(job, start + 60)
    assert early is not None and start + 60 <= early <= start + 65
    assert first_run(job, start + 3600 - 30) is None  # the next slot begins within a minute
    assert first_run(_job(cron="0 * * * *"), start + 60) is None  # cron keeps to its schedule


def test_crontab_weekday_0_is_sunday_not_apschedulers_monday():
    tuesday = datetime(2026, 11, 24, tzinfo=UTC)
    assert crontab_trigger("0 3 * * 0").get_next_fire_time(None, tuesday) == datetime(2026, 11, 29, 3, tzinfo=UTC)
    assert crontab_trigger("0 3 * * 1-5").get_next_fire_time(None, tuesday).weekday() == 1  # Tuesday itself
