"""What a job's schedule means: ``every`` intervals and crontab lines, and the fleet-wide slots they give.

Configuration validates ``every`` and ``cron`` with the functions here, and the scheduler turns the same values into
APScheduler triggers, so a schedule that loads is a schedule that runs. Every replica runs the same schedule,
aligned to :data:`EPOCH`, so the fleet fires each (tenant, job) in the same slots: ``every = "15m"`` means :00, :15,
:30, :45 for the whole fleet. The first replica to take the job's lease in a slot runs it; the others find the slot
already served (see :func:`slot_start`) and skip.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

# APScheduler is imported where a trigger is built, not here: loading a configuration with interval schedules only
# (every command line run) needs none of it, and it costs tens of milliseconds.
if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
CRON_JITTER_SECONDS = 20.0
# A try in a slot waits at most jitter (10 % of the interval) + head start (20 %) + load delay (10 %, see
# graphsync.affinity): well inside the slot, which a try must not leave to serve it.
HEAD_START_SHARE = 0.2
HEAD_START_MAX_SECONDS = 60.0
CRON_HEAD_START_SECONDS = 10.0  # cron slots are minutes: 20 s jitter + 10 s + load stays within one

_INTERVAL = re.compile(r"([0-9]+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CRON_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}


class Schedule(Protocol):
    """A job's schedule as configured: exactly one of an interval and a crontab expression is set."""

    @property
    def interval_seconds(self) -> int | None: ...

    @property
    def cron(self) -> str | None: ...


# --- parsing and validation ------------------------------------------------------------------------
# The check_* functions raise ValueError saying what is expected, for the configuration's error report.


def interval_seconds(every: str) -> int:
    """An ``every`` value such as ``"15m"`` in seconds."""
    match = _INTERVAL.fullmatch(every)
    if match is None or int(match[1]) == 0:
        raise ValueError('expected a positive whole number and a unit s, m, h or d, e.g. "30s", "15m", "1h"')
    return int(match[1]) * _UNIT_SECONDS[match[2]]


def check_interval(every: str) -> str:
    """``every`` unchanged if it is a valid interval."""
    interval_seconds(every)
    return every


def _cron_day(text: str) -> int:
    day = _CRON_DAYS[text] if text in _CRON_DAYS else int(text)
    if not 0 <= day <= 7:
        raise ValueError(f"day of week {text} is not 0-7 or sun-sat")
    return day


def _cron_weekdays(field: str) -> str:
    """A crontab day-of-week field as APScheduler's explicit list of days.

    Crontab counts Sunday as 0 (and 7); APScheduler 3 counts Monday as 0 (its issue 286), so numbers, names,
    ranges (``1-5``, ``5-7``) and steps (``*/2``) are expanded here rather than passed through.
    """
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        base, _, step = part.partition("/")
        every = int(step) if step else 1
        if base == "*":
            first, last = 0, 6
        elif "-" in base:
            first, last = (_cron_day(end) for end in base.split("-", 1))
        else:
            first = _cron_day(base)
            last = 6 if step else first
        if first > last or every < 1:
            raise ValueError(f"day-of-week range {part} is empty")
        days.update(day % 7 for day in range(first, last + 1, every))
    return ",".join(str((day + 6) % 7) for day in sorted(days))


def crontab_trigger(expression: str) -> BaseTrigger:
    """An APScheduler trigger (UTC) that fires when a standard 5-field crontab line would.

    Besides the weekday numbering, crontab runs when *either* the day of month or the day of week matches if
    both are restricted, while APScheduler requires both: that case becomes an OrTrigger of the two.
    """
    from apscheduler.triggers.combining import OrTrigger
    from apscheduler.triggers.cron import CronTrigger

    fields = expression.split()
    if len(fields) != 5:
        raise ValueError("expected 5 fields: minute hour day-of-month month day-of-week")
    minute, hour, day, month, weekday = fields
    weekdays = _cron_weekdays(weekday.lower())
    common = {"minute": minute, "hour": hour, "month": month, "timezone": UTC}
    if day != "*" and weekdays != "*":
        return OrTrigger([CronTrigger(day=day, **common), CronTrigger(day_of_week=weekdays, **common)])
    return CronTrigger(day=day, day_of_week=weekdays, **common)


def check_crontab(expression: str) -> str:
    """``expression`` unchanged if it is a crontab line; APScheduler's reason may quote part of it (not secret)."""
    try:
        crontab_trigger(expression)
    except (ValueError, KeyError) as exc:
        raise ValueError(f'expected a 5-field crontab expression such as "0 * * * *" ({exc})') from None
    return expression


# --- fleet-wide slots ------------------------------------------------------------------------------


def jitter(job: Schedule) -> float:
    """Spread runs a little so many jobs do not hit Graph in the same second; small against the slot."""
    return min(job.interval_seconds * 0.1, 30.0) if job.interval_seconds else CRON_JITTER_SECONDS


def slot_jitter(job: Schedule, pair: str, slot: float) -> float:
    """The jitter of ``pair`` (``tenant/job``) in the slot starting at ``slot``: between 0 and :func:`jitter`.

    A hash, not a random draw, so every replica waits the same for the same pair: the pairs still spread over the
    jitter window, while which replica tries first is left to affinity and load alone (see graphsync.affinity).
    """
    digest = hashlib.blake2b(f"{pair}@{slot:.0f}".encode(), digest_size=8).digest()
    return jitter(job) * int.from_bytes(digest, "big") / 2**64


def head_start(job: Schedule) -> float:
    """How much later than the pair's last runner the other replicas try it: 20 % of the interval, at most 60 s.

    Long enough for the last runner, whose working store is warm, to serve the slot (the others then skip for
    one state read); short enough that a dead replica delays its pairs by a fraction of a slot.
    """
    if not job.interval_seconds:
        return CRON_HEAD_START_SECONDS
    return min(job.interval_seconds * HEAD_START_SHARE, HEAD_START_MAX_SECONDS)


def trigger(job: Schedule) -> BaseTrigger:
    """The fleet-wide slots of a job, without jitter.

    APScheduler 3 computes an interval's next fire time from the previous *jittered* one, so trigger jitter
    accumulates and replicas drift apart; the scheduler delays each try by :func:`slot_jitter` instead.
    """
    if job.interval_seconds:
        from apscheduler.triggers.interval import IntervalTrigger

        return IntervalTrigger(seconds=job.interval_seconds, start_date=EPOCH, timezone=UTC)
    if job.cron is None:
        # Configuration rejects such a job (require_one in config.models); this names the broken promise.
        raise ValueError("a job's schedule needs either an interval or a crontab expression")
    return crontab_trigger(job.cron)


def slot_start(job: Schedule, now: float) -> float:
    """When the current slot began; a run that started after it already served the slot, so others skip.

    Interval jobs: the last multiple of the interval since the epoch. Cron jobs: fire times have minute
    resolution and the jitter stays well under a minute, so the slot is the current minute.
    """
    period = job.interval_seconds or 60
    origin = EPOCH.timestamp()  # the same origin as the interval trigger's start_date
    return origin + math.floor((now - origin) / period) * period


def first_run(job: Schedule, now: float) -> float | None:
    """When to run soon after start, unless the next slot is near anyway (within half an interval, at most 60 s).

    The first run skips like any other if the fleet already served the current slot, so a rolling restart
    causes no extra runs. Cron jobs wait for their schedule: an operator who chose cron chose the times too.
    """
    if not job.interval_seconds:
        return None
    near = min(job.interval_seconds / 2, 60.0)
    left = slot_start(job, now) + job.interval_seconds - now
    if left <= near:
        return None
    return now + random.uniform(0, min(5.0, left - near))
