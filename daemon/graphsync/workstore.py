"""Where each (tenant, job)'s working store lives on this host, and how a run opens it safely.

The store outlives the run (``[output] work_directory``), so the next run on this host starts from it instead of
downloading and loading the published snapshot. Two things can make it unsafe, and both are handled here:

- **another process on this host** (a manual ``graphsync sync`` beside the daemon, or a replica that lost its
  job lease while stalled): an exclusive ``flock`` on ``store.lock`` for the whole run. A run that cannot take it
  works in a throwaway store instead — correct, only cold — rather than wait for or share the file.
- **a damaged file** (a disk error, a truncated copy, an operator's edit): the store is checked when opened; one
  that fails the check is deleted and starts empty, and the run then refreshes it from the published snapshot.

Whether the store's *contents* can be trusted is a separate question, answered by its tag (see
:mod:`graphsync.publication`): a store is never trusted over the published version.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from graphsync.snapshot import SnapshotStore

log = logging.getLogger(__name__)

STORE = "store.sqlite"
LOCK = "store.lock"
THROWAWAY_PREFIX = "graphsync-throwaway-"
THROWAWAY_MAX_AGE_SECONDS = 24 * 3600


class WorkStores:
    """The stores under one work directory: ``<work directory>/<tenant>/<job>/store.sqlite``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, tenant: str, job: str) -> Path:
        return self.directory / tenant / job / STORE

    def is_warm(self, tenant: str, job: str, version: str | None, query: str) -> bool:
        """Whether this host holds a store tagged with the published ``version`` and the job's ``query``, which
        the next run would use as it is (for ``status``; read-only)."""
        path = self.path(tenant, job)
        if version is None or not path.exists():
            return False
        try:
            with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
                meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('version', 'query')").fetchall())
        except sqlite3.Error:
            return False
        return meta == {"version": version, "query": query}

    @contextlib.contextmanager
    def open(self, tenant: str, job: str) -> Iterator[SnapshotStore]:
        """The (tenant, job)'s store, exclusively this process's until the block ends."""
        directory = self.path(tenant, job).parent
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning(
                    "the working store of %s/%s is in use by another process on this host; this run uses a "
                    "throwaway store (correct, but it downloads the snapshot)",
                    tenant,
                    job,
                    extra={"tenant": tenant, "job": job},
                )
                with _throwaway(directory) as store:
                    yield store
                return
            _sweep_throwaways(directory.parent)
            store = _open_checked(self.path(tenant, job), tenant, job)
            try:
                yield store
            finally:
                store.close()


def _open_checked(path: Path, tenant: str, job: str) -> SnapshotStore:
    """Open the store; a damaged one is deleted (journal too) and recreated empty."""
    try:
        store = SnapshotStore(path)
    except sqlite3.DatabaseError as exc:
        problem: sqlite3.DatabaseError | None = exc
    else:
        try:
            store.check()
            return store
        except sqlite3.DatabaseError as exc:
            store.close()
            problem = exc
    log.warning(
        "the working store of %s/%s is damaged (%s); starting it again from the published snapshot",
        tenant,
        job,
        problem,
        extra={"tenant": tenant, "job": job},
    )
    for leftover in (path, path.with_name(path.name + "-journal")):
        leftover.unlink(missing_ok=True)
    return SnapshotStore(path)


def _sweep_throwaways(tenant_directory: Path) -> None:
    """Remove throwaway stores a killed process left behind (SIGKILL skips their cleanup). A day old at least:
    no run lasts that long, so a live one is never touched."""
    for leftover in tenant_directory.glob(f"{THROWAWAY_PREFIX}*"):
        with contextlib.suppress(OSError):
            if time.time() - leftover.stat().st_mtime > THROWAWAY_MAX_AGE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _throwaway(directory: Path) -> Iterator[SnapshotStore]:
    with tempfile.TemporaryDirectory(prefix=THROWAWAY_PREFIX, dir=directory.parent) as scratch:
        store = SnapshotStore(Path(scratch) / STORE)
        try:
            yield store
        finally:
            store.close()
