"""Graph change notifications that start a delta round early; the schedule stays the backstop (issue 16).

Modules: ``records`` (each tenant's subscriptions, kept in storage), ``directory`` (what this replica knows, to
verify notifications), ``endpoint`` (the HTTP endpoint Graph posts to), ``manager`` (create, renew, re-create and
delete subscriptions, one replica at a time), ``upkeep`` (the maintenance of each slot and the lifecycle actions, on
threads of their own) and ``service`` (the daemon's companion that ties them together).
"""

from graphsync.notify.manager import SUBSCRIBABLE, SubscriptionManager, subscribable
from graphsync.notify.records import SubscriptionRecords, TenantRecord
from graphsync.notify.service import NotificationService

__all__ = [
    "SUBSCRIBABLE",
    "NotificationService",
    "SubscriptionManager",
    "SubscriptionRecords",
    "TenantRecord",
    "subscribable",
]
