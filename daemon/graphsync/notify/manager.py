"""Keeping each tenant's Graph subscriptions alive: create, renew well before expiry, re-create, delete.

One replica at a time changes a tenant's subscriptions: it holds the tenant's subscription lease (the job locks'
machinery) while it works, and records what it did in the tenant's record (:mod:`graphsync.notify.records`),
``maintained_at`` included. Every replica tries each slot of ``check_every``; one that finds the slot served reads
no further, so the fleet maintains each tenant once per slot, and a replica that dies (even SIGKILLed mid-way) is
replaced by whichever replica comes next: its lease expires, and the record says what exists.

Graph facts this relies on: ``POST /subscriptions`` validates both URLs before it answers; ``PATCH
/subscriptions/{id}`` with a new ``expirationDateTime`` renews (and reauthorizes); a subscription Graph removed or
let expire answers 404, and is created again, followed by a catch-up round since notifications were lost meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from graphsync.graph import GraphClient, GraphError
from graphsync.identity import TokenError
from graphsync.metrics import SUBSCRIPTION_EXPIRY, SUBSCRIPTION_FAILING, SUBSCRIPTION_OPERATIONS
from graphsync.notify.records import Subscription, SubscriptionRecords, TenantRecord, lock_blob
from graphsync.storage import BlobStore, WriteConflict
from graphsync.timestamps import TICKS_PER_SECOND, graph_ticks, iso_utc

if TYPE_CHECKING:
    from graphsync.config import JobSettings, Settings

log = logging.getLogger(__name__)

SUBSCRIBABLE = frozenset({"users", "groups"})  # directory resources whose change notifications we use
CHANGE_TYPES = "updated,deleted"  # all that users and groups support ("created" arrives as "updated")
LEASE_SECONDS = 30
Action = Literal["renew", "recreate"]
Outcome = Literal["served", "busy", "done", "incomplete"]  # incomplete: done, but some call failed


def subscribable(settings: Settings, tenant: str) -> dict[str, JobSettings]:
    """The tenant's jobs that get a subscription: delta jobs of a resource Graph notifies about."""
    return {
        job.name: job
        for job in settings.jobs
        if job.delta and job.resource in SUBSCRIBABLE and tenant in settings.job_tenants(job)
    }


class SubscriptionManager:
    def __init__(
        self,
        settings: Settings,
        graph: GraphClient,
        records: SubscriptionRecords,
        locks: BlobStore,
        *,
        replica: str,
        learn: Callable[[TenantRecord], None],
        catch_up: Callable[[str, str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert settings.notifications is not None
        self._settings = settings
        self._notifications = settings.notifications
        self._graph = graph
        self._records = records
        self._locks = locks
        self._replica = replica
        self._learn = learn
        self._exported: dict[str, set[str]] = {}  # by tenant: the jobs whose subscription gauges are set
        self._catch_up = catch_up
        self._clock = clock

    def maintain(self, tenant: str, slot: float | None, actions: Mapping[str, Action] | None = None) -> Outcome:
        """Look after ``tenant``'s subscriptions unless the slot starting at ``slot`` was served already.

        ``actions`` (from lifecycle notifications) are done now, whatever the slot. StorageError propagates.
        """
        record = self._records.read(tenant)
        self._seen(record)
        if not actions and _served(record, slot):
            return "served"
        lease = self._locks.try_lease(lock_blob(tenant), LEASE_SECONDS)
        if lease is None:
            return "busy"
        with lease:
            record = self._records.read(tenant)
            if not actions and _served(record, slot):
                return "served"
            started = self._clock()
            self._reconcile(record, actions or {}, lambda: lease.lost)
            if lease.lost:
                log.warning("lost the subscription lease of %s mid-way; not recording this maintenance", tenant)
                return "busy"
            record.maintained_at, record.maintained_by = started, self._replica
            try:
                self._records.write(record)
            except WriteConflict:
                log.error("the subscription record of %s changed under this maintenance (lease lost?)", tenant)
                return "busy"
        self._seen(record)
        return "incomplete" if record.errors else "done"

    def _seen(self, record: TenantRecord) -> None:
        """What the record says, to the directory and to the gauges: every replica reads each tenant's record each
        slot, so each exports the fleet's view, and the alerts still see it when the replica that maintains the
        subscriptions is gone."""
        self._learn(record)
        self._exported[record.tenant] = _export(record, self._exported.get(record.tenant, set()))

    def _reconcile(self, record: TenantRecord, actions: Mapping[str, Action], lost: Callable[[], bool]) -> None:
        tenant, wanted = record.tenant, subscribable(self._settings, record.tenant)
        for name in sorted(set(record.subscriptions) - set(wanted)):
            if self._delete(tenant, name, record.subscriptions[name]):
                del record.subscriptions[name]
                record.errors.pop(name, None)
        for name, job in wanted.items():
            if lost():
                return
            current = record.subscriptions.get(name)
            try:
                if current is not None and self._moved(current):
                    self._delete(tenant, name, current)
                    current = None
                if current is None or actions.get(name) == "recreate":
                    record.subscriptions[name] = self._create(tenant, job, catch_up=current is not None)
                elif actions.get(name) == "renew" or self._due(current):
                    record.subscriptions[name] = self._renew(tenant, job, current)
                record.errors.pop(name, None)
            except (GraphError, TokenError) as exc:
                record.errors[name] = str(exc)
                log.error("subscription of %s/%s: %s", tenant, name, exc, extra={"tenant": tenant, "job": name})

    def _moved(self, sub: Subscription) -> bool:
        """Created for other URLs: Graph cannot add a lifecycle URL to a subscription, so it is made anew."""
        return (sub.notification_url, sub.lifecycle_url) != (
            self._notifications.notification_url,
            self._notifications.lifecycle,
        )

    def _due(self, sub: Subscription) -> bool:
        return sub.expires - self._clock() <= self._notifications.renew_before_seconds

    def _expiry(self) -> str:
        return iso_utc(self._clock() + self._notifications.lifetime_seconds, timespec="milliseconds")

    def _create(self, tenant: str, job: JobSettings, *, catch_up: bool) -> Subscription:
        client_state = secrets.token_urlsafe(48)  # 64 characters; Graph allows 128
        body = {
            "changeType": CHANGE_TYPES,
            "notificationUrl": self._notifications.notification_url,
            "lifecycleNotificationUrl": self._notifications.lifecycle,
            "resource": job.resource,
            "expirationDateTime": self._expiry(),
            "clientState": client_state,
        }
        answer = self._call(tenant, job.name, "create", "POST", f"{self._graph.base_url}/subscriptions", body)
        if not isinstance(answer.get("id"), str):
            raise GraphError(f"POST /subscriptions for {tenant}/{job.name}: the answer has no subscription id")
        now = self._clock()
        log.info("created the %s subscription of %s (job %s)", job.resource, tenant, job.name, extra={"tenant": tenant})
        sub = Subscription(
            answer["id"],
            job.resource,
            client_state,
            _expires(answer, now + self._notifications.lifetime_seconds),
            self._notifications.notification_url,
            self._notifications.lifecycle,
            now,
        )
        if catch_up:  # changes made while no subscription existed were never announced
            self._catch_up(tenant, job.name)
        return sub

    def _renew(self, tenant: str, job: JobSettings, sub: Subscription) -> Subscription:
        url = f"{self._graph.base_url}/subscriptions/{sub.id}"
        try:
            answer = self._call(tenant, job.name, "renew", "PATCH", url, {"expirationDateTime": self._expiry()})
        except GraphError as exc:
            if exc.status != 404:
                raise
            log.warning("the subscription of %s/%s is gone from Graph; creating it again", tenant, job.name)
            return self._create(tenant, job, catch_up=True)
        now = self._clock()
        sub.expires, sub.renewed = _expires(answer, now + self._notifications.lifetime_seconds), now
        return sub

    def _delete(self, tenant: str, job: str, sub: Subscription) -> bool:
        """Delete ``sub`` from Graph (already gone counts as done); False when Graph could not be asked."""
        try:
            self._call(tenant, job, "delete", "DELETE", f"{self._graph.base_url}/subscriptions/{sub.id}", None)
        except GraphError as exc:
            if exc.status != 404:
                log.error("cannot delete the subscription of %s/%s: %s", tenant, job, exc)
                return False
        except TokenError as exc:
            log.error("cannot delete the subscription of %s/%s: %s", tenant, job, exc)
            return False
        return True

    def _call(
        self, tenant: str, job: str, operation: str, method: str, url: str, body: dict[str, str] | None
    ) -> dict[str, Any]:
        try:
            answer = self._graph.send(tenant, method, url, body)
        except (GraphError, TokenError):
            SUBSCRIPTION_OPERATIONS.labels(tenant, job, operation, "failed").inc()
            raise
        SUBSCRIPTION_OPERATIONS.labels(tenant, job, operation, "ok").inc()
        return answer or {}


def _export(record: TenantRecord, before: set[str]) -> set[str]:
    """Set the record's subscription gauges, remove those of jobs it no longer names; the jobs it names."""
    tenant, jobs = record.tenant, set(record.subscriptions) | set(record.errors)
    for job in before - jobs:
        for gauge in (SUBSCRIPTION_EXPIRY, SUBSCRIPTION_FAILING):
            with contextlib.suppress(KeyError):
                gauge.remove(tenant, job)
    for job in jobs:
        SUBSCRIPTION_FAILING.labels(tenant, job).set(1 if job in record.errors else 0)
        if (sub := record.subscriptions.get(job)) is not None:
            SUBSCRIPTION_EXPIRY.labels(tenant, job).set(sub.expires)
        else:
            with contextlib.suppress(KeyError):
                SUBSCRIPTION_EXPIRY.remove(tenant, job)
    return jobs


def _served(record: TenantRecord, slot: float | None) -> bool:
    return slot is not None and record.maintained_at is not None and record.maintained_at >= slot


def _expires(answer: Mapping[str, object], asked: float) -> float:
    """The expiry Graph answered (it may shorten what was asked), else what was asked."""
    text = answer.get("expirationDateTime")
    try:
        return graph_ticks(text) / TICKS_PER_SECOND if isinstance(text, str) else asked
    except ValueError:
        return asked
