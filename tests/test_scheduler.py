"""Fleet-wide slots: pure functions of the schedule, no processes needed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from graphsync.config import JobSettings, load_settings
from graphsync.pool import Try
from graphsync.schedule import crontab_trigger, first_run, head_start, jitter, slot_jitter, slot_start, trigger
from graphsync.scheduler import Daemon


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


def _fire_days(expr: str, days: int = 14) -> list[str]:
    """The weekday names on which ``expr`` fires at least once in the ``days`` after Tuesday 2026-11-24."""
    trig, now, end = crontab_trigger(expr), datetime(2026, 11, 24, tzinfo=UTC), datetime(2026, 12, 8, tzinfo=UTC)
    fired = []
    while (now := trig.get_next_fire_time(None, now)) and now < end:
        fired.append(now.strftime("%a %d"))
        now = now.replace(hour=23, minute=59)
    return fired


def test_crontab_weekdays_follow_crontab_not_apscheduler():
    assert _fire_days("0 3 * * 0")[:2] == ["Sun 29", "Sun 06"]  # APScheduler alone would say Monday
    assert _fire_days("0 3 * * 7")[:1] == ["Sun 29"]
    assert _fire_days("0 3 * * 1-5")[:4] == ["Tue 24", "Wed 25", "Thu 26", "Fri 27"]
    assert _fire_days("0 3 * * 5-7")[:3] == ["Fri 27", "Sat 28", "Sun 29"]
    assert _fire_days("0 3 * * 0-6")[:7] == ["Tue 24", "Wed 25", "Thu 26", "Fri 27", "Sat 28", "Sun 29", "Mon 30"]
    assert _fire_days("0 3 * * */2")[:4] == ["Tue 24", "Thu 26", "Sat 28", "Sun 29"]
    assert _fire_days("0 3 * * mon,wed")[:2] == ["Wed 25", "Mon 30"]


def test_crontab_day_of_month_and_weekday_mean_either_as_in_cron():
    assert _fire_days("0 3 1 * 1") == ["Mon 30", "Tue 01", "Mon 07"]  # the 1st, or any Monday


def test_interval_slots_of_days_and_odd_minutes_match_the_trigger():
    for every in ("7d", "2d", "7m", "25m", "49s"):
        job = _job(every=every)
        now = 1_800_000_123.4
        fire = trigger(job).get_next_fire_time(None, datetime.fromtimestamp(now, UTC)).timestamp()
        assert slot_start(job, now) == fire - job.interval_seconds, every


def test_a_pairs_jitter_is_the_same_on_every_replica_and_spreads_pairs_over_the_window():
    job = _job(every="15m")
    slot = slot_start(job, 1_800_000_123.4)
    spread = [slot_jitter(job, f"tenant{index}/users", slot) for index in range(200)]
    assert spread == [slot_jitter(job, f"tenant{index}/users", slot) for index in range(200)]
    assert all(0 <= value < jitter(job) for value in spread)
    assert max(spread) - min(spread) > 0.8 * jitter(job)
    assert slot_jitter(job, "tenant0/users", slot + 900) != spread[0], "a new draw each slot"


def test_the_head_start_is_a_fifth_of_the_interval_at_most_a_minute():
    assert head_start(_job(every="30s")) == 6
    assert head_start(_job(every="15m")) == 60
    assert head_start(_job(cron="*/5 * * * *")) == 10
    for every in ("5s", "30s", "15m", "1d"):
        job = _job(every=every)
        assert jitter(job) + head_start(job) * 1.5 < job.interval_seconds, "a try stays inside its slot"


class _RecordingRunner:
    """Stands in for JobRunner: records the slot each run was asked to serve."""

    replica = "replica-b"

    def __init__(self) -> None:
        self.due_after: list[float | None] = []

    def run(self, job: JobSettings, tenant: str, **options: object) -> object:
        self.due_after.append(options["due_after"])  # type: ignore[arg-type]
        return type("Result", (), {"runner": None})()


def test_a_try_taken_late_still_serves_the_slot_it_fired_for(tmp_path: Path) -> None:
    """A busy pool may take a cron try after its minute: it must still count another replica's success in that
    slot, not check against the minute it was taken in (which would run the pair twice in one hourly slot)."""
    config = tmp_path / "graphsync.toml"
    config.write_text(
        "[identity]\n"
        'client_id = "11111111-1111-1111-1111-111111111111"\ntenants = ["contoso.onmicrosoft.com"]\n'
        'client_secret = "s"\n'
        "[storage]\n"
        'connection_string = "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:1/a;"\n'
        '[[jobs]]\nname = "users"\nresource = "users"\ncron = "0 * * * *"\n'
    )
    settings = load_settings(config, {})
    fired = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    now = [fired]
    runner = _RecordingRunner()
    daemon = Daemon(settings, runner, clock=lambda: now[0])  # type: ignore[arg-type]
    tries: list[Try] = []
    daemon._pool.put = tries.append  # type: ignore[method-assign]  # hold the try instead of running it
    daemon._due(settings.jobs[0], "contoso.onmicrosoft.com")
    now[0] = fired + 65  # the workers were busy; the try is taken at 12:01:05
    daemon._run(tries[0])
    assert runner.due_after == [fired]


def test_an_urgent_try_that_finds_its_pair_busy_backs_off_with_the_notifications_age_up_to_30_s() -> None:
    """A notification during another replica's hour-long round must not cost a lease attempt a second."""
    from graphsync.scheduler import URGENT_RETRY_MAX_SECONDS, URGENT_RETRY_SECONDS, _urgent_retry

    job = JobSettings(name="users", resource="users", delta=True, every="15m")
    came = 1_000.0
    waits = []
    now = came + 0.5
    while now < came + 3600:
        wait = _urgent_retry(Try(job, "t", now, came, urgent=True), now)
        waits.append(wait)
        now += wait
    assert waits[0] == URGENT_RETRY_SECONDS
    assert waits == sorted(waits) and max(waits) == URGENT_RETRY_MAX_SECONDS
    assert len(waits) < 140, f"{len(waits)} looks in an hour"
