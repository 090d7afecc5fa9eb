"""What ``graphsync status`` reports: the fleet's shared token caches and every job's state, read from storage.

Everything is read from what the replicas share (state files, lock leases, cache blobs), so the report covers the
whole fleet, whichever host runs it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from graphsync.jobs import lock_blob
from graphsync.rounds import store_query
from graphsync.schedule import trigger
from graphsync.storage import StorageError
from graphsync.tables import tables_status
from graphsync.timestamps import epoch

if TYPE_CHECKING:
    from graphsync.config import Settings
    from graphsync.sinks import Sink
    from graphsync.storage import BlobStore
    from graphsync.tokencache import TokenCaches
    from graphsync.workstore import WorkStores

DELTA_TOKEN_WARNING_SECONDS = 6 * 24 * 3600  # directory delta tokens expire after 7 days


def fleet_status(
    settings: Settings, caches: TokenCaches, sink: Sink, locks: BlobStore, stores: WorkStores, now: float
) -> dict[str, Any]:
    """What ``graphsync status`` reports: each tenant's shared token cache and each job's state, fleet-wide, and
    whether this host holds a warm working store for it (one local file read, no storage call)."""
    jobs = []
    for job in settings.jobs:
        for tenant in settings.job_tenants(job):
            try:
                state = sink.read_state(tenant, job.name)[0] or {}
            except StorageError as exc:  # report it on this job's line; the other lines still help
                state = {"last_error": f"state.json unreadable: {exc}"}
            try:
                holder = locks.lease_holder(lock_blob(tenant, job.name))
            except StorageError as exc:
                holder = f"unknown ({exc})"
            next_due = trigger(job).get_next_fire_time(None, datetime.fromtimestamp(now, UTC))
            warnings = []
            last_success = state.get("last_success")
            if job.delta and last_success and now - epoch(last_success) > DELTA_TOKEN_WARNING_SECONDS:
                warnings.append(
                    "last success is over 6 days old: the delta token expires after 7 days, "
                    "and the next run will be a full resync"
                )
            snapshot = state.get("snapshot")
            if not isinstance(snapshot, dict):
                snapshot = {}
            jobs.append(
                {
                    "tenant": tenant,
                    "job": job.name,
                    "resource": job.resource,
                    "last_success": last_success,
                    "last_failure": state.get("last_failure"),
                    "last_error": state.get("last_error"),
                    "objects": state.get("objects"),
                    "snapshot_bytes": snapshot.get("bytes"),
                    "snapshot_chunks": snapshot.get("chunks"),
                    "warm_store_here": stores.is_warm(
                        tenant, job.name, snapshot.get("version"), store_query(sink, job)
                    ),
                    "next_due": next_due.isoformat() if next_due else None,
                    "lock_holder": holder,
                    "warnings": warnings,
                }
            )
    tenants = [caches[tenant].inspect_blob() for tenant in caches.tenants]
    report: dict[str, Any] = {"output": sink.describe(), "tenants": tenants, "jobs": jobs}
    if (tables := tables_status(settings)) is not None:
        report["tables"] = tables
    return report
