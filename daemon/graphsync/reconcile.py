"""Drift reconciliation: a delta job's periodic full round, compared with the snapshot it replaces.

Why: delta can miss changes (Graph's docs-contrib tracker has membership removals that never appear in
``members@delta``), and a directory delta token dies after 7 days without a run. A full round every
``reconcile_every`` (default 6 days, below that lifetime) puts the snapshot right, and comparing it with what was
published says how wrong the snapshot had become: *drift*, which an operator should see, per kind.

The run first applies the saved delta link as an ordinary delta round (published, with its change file): changes
that delta reports are not drift, and the published snapshot is up to an interval older than the directory. The
full round that follows is an ordinary full round too (:mod:`graphsync.rounds`): it publishes only the chunks that
differ (nothing at all when there is no drift) and writes its ``-full`` change file. What this module adds is the
comparison: the working store's lines, saved between the two rounds, against the store after the full round, both
in id order, so memory holds two lines at a time whatever the directory's size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from graphsync.metrics import RECONCILE_DRIFT, RECONCILE_LAST
from graphsync.snapshot import MEMBERS, SnapshotStore
from graphsync.timestamps import epoch

if TYPE_CHECKING:
    from graphsync.config import JobSettings

log = logging.getLogger(__name__)

# Relative to the published snapshot: objects it lacked, held after they were gone, or held with other
# properties (a manager link is a property); group member links it lacked or held after they were gone.
DRIFT_KINDS = ("missing", "extra", "different", "member_missing", "member_extra")
FIRST_IDS = 5  # ids kept per kind, for the log line and state.json
LAST_FULL_ROUND = "last_full_round"  # the state.json key that times the next reconciliation


@dataclass
class Drift:
    """How far the published snapshot was from a full round: counts per kind, and the first ids of each."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DRIFT_KINDS, 0))
    first_ids: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in DRIFT_KINDS})

    def add(self, kind: str, object_id: str, count: int = 1) -> None:
        self.counts[kind] += count
        if len(self.first_ids[kind]) < FIRST_IDS:
            self.first_ids[kind].append(object_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_state(self) -> dict[str, Any]:
        """What ``state.json`` keeps of it."""
        return {"drift": dict(self.counts), "first_ids": {kind: ids for kind, ids in self.first_ids.items() if ids}}


def reconciliation_due(job: JobSettings, state: dict[str, Any], now: float) -> bool:
    """Whether this run of ``job`` should be a reconciling full round.

    A state without a recorded full round (one written before reconciliation existed) is due at once: a single
    full round per job, after which the interval holds.
    """
    seconds = job.reconcile_seconds
    if seconds is None:
        return False
    last = state.get(LAST_FULL_ROUND)
    return not isinstance(last, str) or now - epoch(last) >= seconds


@contextlib.contextmanager
def saved_lines(store: SnapshotStore) -> Iterator[IO[bytes]]:
    """The store's snapshot lines in a temporary file beside it, for :func:`compare` after the store is replaced."""
    with tempfile.TemporaryFile(dir=Path(store.path).parent) as file:
        file.writelines(store.lines())
        file.seek(0)
        yield file


def compare(before: Iterable[bytes], after: Iterable[tuple[str, bytes]]) -> Drift:
    """The drift between snapshot lines ``before`` and the ``(id, line)`` entries ``after``, both sorted by id."""
    drift = Drift()
    old = ((json.loads(line)["id"], line) for line in before if line.strip())
    new = iter(after)
    a, b = next(old, None), next(new, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            drift.add("extra", a[0])
            a = next(old, None)
        elif a is None or b[0] < a[0]:
            drift.add("missing", b[0])
            b = next(new, None)
        else:
            if a[1] != b[1]:  # equal objects are equal lines: the store writes one canonical form
                _compare_object(drift, a[0], json.loads(a[1]), json.loads(b[1]))
            a, b = next(old, None), next(new, None)
    return drift


def _compare_object(drift: Drift, object_id: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    members_before = set(before.pop(MEMBERS, None) or ())
    members_after = set(after.pop(MEMBERS, None) or ())
    if missing := len(members_after - members_before):
        drift.add("member_missing", object_id, missing)
    if extra := len(members_before - members_after):
        drift.add("member_extra", object_id, extra)
    if before != after:
        drift.add("different", object_id)


def report_drift(drift: Drift, tenant: str, job: str) -> None:
    """Log the drift: a warning with the first ids when there is any."""
    extra = {"tenant": tenant, "job": job}
    if not drift.total:
        log.info("reconciliation of %s/%s: the snapshot matched a full round", tenant, job, extra=extra)
        return
    found = "; ".join(
        f"{count} {kind.replace('_', ' ')} (first: {', '.join(drift.first_ids[kind])})"
        for kind, count in drift.counts.items()
        if count
    )
    log.warning("reconciliation of %s/%s found drift, now corrected: %s", tenant, job, found, extra=extra)


def export_reconciliation(tenant: str, job: str, recorded: Any) -> None:
    """Expose the reconciliation ``state.json`` records (``"reconciliation"``) as ``graphsync_reconcile_*``.

    Called with the state each run reads as well as after a reconciliation, so that any replica that runs the job
    exports the fleet's last reconciliation, after a restart too; a state without one (or an unreadable one)
    changes nothing.
    """
    try:
        at = epoch(recorded["at"])
        counts = {kind: int(recorded["drift"][kind]) for kind in DRIFT_KINDS}
    except (KeyError, TypeError, ValueError):
        return
    for kind, count in counts.items():
        RECONCILE_DRIFT.labels(tenant, job, kind).set(count)
    RECONCILE_LAST.labels(tenant, job).set(at)
