"""Which subscriptions this replica knows, so that it verifies a notification without a storage call.

Any replica behind the load balancer may receive a notification of a subscription another replica created. Each
replica learns every tenant's record when it reads it (each maintenance slot, and after writing it); a notification
of a subscription it does not know yet starts one re-read of all records and is answered "try again" (503) until
that read has finished: Graph redelivers for hours, by when the record is known. Unknown ids that come while a
re-read is under way, or within :data:`REFRESH_SECONDS` after it ended, start no other (so forged ids cannot make
it hammer storage); an id still unknown after a read that finished is refused (403).
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from graphsync.notify.records import TenantRecord

REFRESH_SECONDS = 5.0


@dataclass(frozen=True)
class Entry:
    """A known subscription: whose it is and the secret its notifications must carry."""

    subscription_id: str
    tenant: str
    job: str
    client_state: str = field(repr=False)


class Refused(Enum):
    """Why a notification's subscription was not verified."""

    MISMATCH = "client_state"  # a known subscription, the wrong secret: forged, or a stale copy of ours
    UNKNOWN = "unknown_subscription"  # not ours, as of a fresh read of the records
    STALE = "stale"  # not known yet; the records are being read again, so Graph should retry


class Directory:
    def __init__(
        self, refresh: Callable[[Callable[[], None]], None], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._refresh = refresh  # re-read every record, then call the callable it is given
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._by_tenant: dict[str, set[str]] = {}
        self._refreshed = float("-inf")  # when the last re-read ended
        self._refreshing = False

    def learn(self, record: TenantRecord) -> None:
        """Replace what is known of ``record.tenant`` with what the record says."""
        entries = {
            sub.id: Entry(sub.id, record.tenant, job, sub.client_state) for job, sub in record.subscriptions.items()
        }
        with self._lock:
            for old in self._by_tenant.pop(record.tenant, set()):
                self._entries.pop(old, None)
            self._entries.update(entries)
            self._by_tenant[record.tenant] = set(entries)

    def entry(self, tenant: str, job: str) -> Entry | None:
        with self._lock:
            return next(
                (e for i in self._by_tenant.get(tenant, ()) if (e := self._entries[i]).job == job),
                None,
            )

    def verify(self, subscription_id: str, client_state: str) -> Entry | Refused:
        """The subscription if ``client_state`` is its secret (compared in constant time), else why not."""
        with self._lock:
            entry = self._entries.get(subscription_id)
            if entry is None:
                if self._refreshing:
                    return Refused.STALE
                if self._clock() - self._refreshed < REFRESH_SECONDS:
                    return Refused.UNKNOWN
                self._refreshing = True
        if entry is None:
            self._refresh(self._refresh_ended)
            return Refused.STALE
        if not hmac.compare_digest(entry.client_state.encode(), client_state.encode()):
            return Refused.MISMATCH
        return entry

    def _refresh_ended(self) -> None:
        with self._lock:
            self._refreshing = False
            self._refreshed = self._clock()
