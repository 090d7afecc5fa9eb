"""What ``graphsync status`` reports: the fleet's shared token caches and every job's state, read from storage.

Everything is read from what the replicas share (state files, lock leases, cache blobs), so the report covers the
whole fleet, whichever host runs it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from graphsync.jobs import lock_blob
from graphsync.notify.manager import subscribable
from graphsync.notify.records import RecordError, SubscriptionRecords, record_blob
from graphsync.rounds import store_query
from graphsync.schedule import trigger
from graphsync.storage import StorageError
from graphsync.tables import tables_status
from graphsync.timestamps import epoch, iso_utc

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
    jobs: list[dict[str, Any]] = []
    states: dict[tuple[str, str], dict[str, Any]] = {}
    for job in settings.jobs:
        for tenant in settings.job_tenants(job):
            try:
                state = sink.read_state(tenant, job.name)[0] or {}
            except StorageError as exc:  # report it on this job's line; the other lines still help
                state = {"last_error": f"state.json unreadable: {exc}"}
            states[tenant, job.name] = state
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
    subscriptions = subscription_status(settings, locks, states, now) if settings.notifications else []
    report: dict[str, Any] = {"output": sink.describe(), "tenants": tenants, "jobs": jobs}
    report["subscriptions"] = subscriptions
    if (tables := tables_status(settings)) is not None:
        report["tables"] = tables
    return report


def subscription_status(
    settings: Settings, store: BlobStore, states: dict[tuple[str, str], dict[str, Any]], now: float
) -> list[dict[str, Any]]:
    """Each subscription the fleet keeps (or should keep), from ``subscriptions/<tenant>.json``: the resource, its
    expiry, the last notification (state.json's ``last_notification``, written by the round that served it) and
    the last error; never the ``clientState``. A tenant whose record cannot be read gets one line saying why."""
    assert settings.notifications is not None
    margin = settings.notifications.renew_before_seconds
    records = SubscriptionRecords(store, settings.storage.encryption_keys)
    lines: list[dict[str, Any]] = []
    for tenant in settings.identity.tenants:
        wanted = {name: job.resource for name, job in subscribable(settings, tenant).items()}
        try:
            record = records.read(tenant)
        except (StorageError, RecordError) as exc:
            lines.append({"tenant": tenant, "job": None, "error": f"{record_blob(tenant)} unreadable: {exc}"})
            continue
        for name in sorted(wanted.keys() | record.subscriptions.keys()):
            sub = record.subscriptions.get(name)
            warnings = []
            if sub is None:
                warnings.append("no subscription yet: changes reach the export on its schedule only")
            elif sub.expires <= now:
                warnings.append("expired: Graph sends no notifications until the next check creates it again")
            elif sub.expires - now < margin / 2:
                warnings.append("renewal is overdue: half the renew_before margin is gone")
            if name not in wanted:
                warnings.append("its job has no subscription in the configuration any more; the next check deletes it")
            lines.append(
                {
                    "tenant": tenant,
                    "job": name,
                    "resource": sub.resource if sub else wanted[name],
                    "subscription_id": sub.id if sub else None,
                    "expires": iso_utc(sub.expires) if sub else None,
                    "renewed": iso_utc(sub.renewed) if sub and sub.renewed else None,
                    "last_notification": states.get((tenant, name), {}).get("last_notification"),
                    "maintained_at": iso_utc(record.maintained_at) if record.maintained_at else None,
                    "maintained_by": record.maintained_by,
                    "error": record.errors.get(name),
                    "warnings": warnings,
                }
            )
    return lines
