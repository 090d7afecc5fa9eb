"""A local HTTPS fake of Microsoft Graph collections: full listings, delta queries, faults.

Why a fake rather than mocks: graphsync's correctness lives in how it walks Graph's paging
and delta protocol -- opaque ``@odata.nextLink``/``@odata.deltaLink`` URLs, records that
repeat or arrive split across pages, ``@removed`` tombstones, partial (``return=minimal``)
updates, expired sync state, throttling and truncated responses.  A real HTTPS server lets
the daemon (in-process or as a subprocess) use its real HTTP stack against all of that,
while the test owns the directory contents, the faults, and a record of every request.

Served (one host for every tenant, as in real Graph; the tenant is the one the bearer
token was issued for by :class:`~tests.fakes.entra.FakeEntra`):

* ``GET /v1.0/{resource}?$select=a,b&$top=N`` -- a full listing, paged with ``$skiptoken``.
  ``$expand=members`` on ``groups`` adds a ``members`` array.
* ``GET /v1.0/{resource}/delta?$select=...&$expand=...`` -- starts a delta round (``$top`` is ignored);
  ``$deltatoken=latest`` returns just a deltaLink for "from now on".  Relationships are tracked
  as Graph documents them, as ``<name>@delta`` annotations: a group's ``members`` (in
  ``$select`` or ``$expand``), its ``owners`` (in ``$select``), a directory role's ``members``
  and a user's ``manager`` (likewise); ``$expand`` of anything else is a 400, as on Graph.
* ``GET <@odata.deltaLink>`` -- the changes since that link was issued, paged the same way.
* ``GET /v1.0/{resource}/{id}`` -- one object.
* ``GET /v1.0/auditLogs/signIns?$filter=createdDateTime ge 2024-05-01T00:00:00Z and ...&$top=N``
  (likewise ``auditLogs/directoryAudits`` and ``auditLogs/provisioning`` on ``activityDateTime``)
  -- an append-only log: no delta, filtered by its timestamp with the operators each log's page
  documents (sign-ins and directory audits: ``eq``/``ge``/``le``; provisioning: ``eq``/``gt``/``lt``;
  anything else is a 400), compared to the 100-ns tick as Graph's DateTimeOffset is, ordered by
  ``$orderby=<timestamp> desc|asc`` (sign-ins are documented newest first without it; the other two
  document no order, and the fake serves them oldest first), ``$select`` honoured (``id`` always
  comes), paged with ``$skiptoken``, ``$top`` capped at 1,000, as Graph documents; with
  :attr:`FakeGraph.reports_limit` set, requests beyond that rate get 429 with ``Retry-After``,
  as the reporting APIs' much lower limits (5 requests per 10 s per app and tenant) do.

Link shapes (treat them as opaque; they are documented so test failures are readable)::

    {base_url}/v1.0/{resource}?$skiptoken=<token>          next page of a listing
    {base_url}/v1.0/{resource}/delta?$skiptoken=<token>    next page of a delta round
    {base_url}/v1.0/{resource}/delta?$deltatoken=<token>   the deltaLink

A round's pages are decided when the round starts (the ids to enumerate, or the change
records) and kept server-side under an opaque round id, so fetching the same nextLink again
(a retry after a truncated page) returns the same page, and 100,000 objects cost one O(n)
pass per round rather than per page.  Object properties are rendered when a page is served,
from the current state: a page can be newer than the round's start, never older, and
anything changed after the start is in the next round anyway because the deltaLink
remembers the change-log position of the round's start.

Deliberate simplifications: users and groups are independent collections (deleting a user
does not remove it from groups, nor as anyone's manager); only ``groups`` have members, and
members and managers are always ``#microsoft.graph.user``; a removed manager comes as a
``manager@delta`` entry with ``@removed``, the way ``members@delta`` reports removals; with
``$select``, only changes to selected properties make an object show up in a changes round;
without ``$select`` every stored property is returned.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import dataclasses
import json
import logging
import math
import random
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import trustme

from tests.fakes.entra import FakeEntra, tenant_id
from tests.fakes.https import FakeHttpServer, Knob, LoopbackHttpsServer
from tests.fakes.subscriptions import FakeSubscriptions, SubscriptionError

__all__ = [
    "LOG_TIMES",
    "MAX_PAGE_SIZE",
    "FakeGraph",
    "GraphRequest",
    "fake_graph",
    "mutate",
    "populate",
]

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 999  # the largest $top Graph honours for directory objects
MEMBER_TYPE = "#microsoft.graph.user"
_MEMBER_RESOURCES = frozenset({"groups", "directoryRoles"})
_LINK_OF = {"groups": "members", "users": "manager", "directoryRoles": "members"}  # what delta can $expand
_SELECTED_LINKS = {"groups": frozenset({"owners"})}  # tracked like members when in $select (ids only)
_LINK_NAMES = frozenset({"members", "manager", "owners"})
_DELTA_SEGMENTS = frozenset({"delta", "delta()", "microsoft.graph.delta", "microsoft.graph.delta()"})
_ALL = "*"  # the key under which requests of every tenant are counted together
_MAX_ROUNDS = 1000  # rounds kept for their skiptokens; the oldest are forgotten first
# The logs Graph serves only by time: the timestamp each one filters and orders on.
LOG_TIMES = {
    "auditLogs/signIns": "createdDateTime",
    "auditLogs/directoryAudits": "activityDateTime",
    "auditLogs/provisioning": "activityDateTime",
}
# The $filter operators each log's page documents on its timestamp (Graph answers others with 400).
_LOG_OPERATORS = {
    "auditLogs/signIns": frozenset({"eq", "ge", "le"}),
    "auditLogs/directoryAudits": frozenset({"eq", "ge", "le"}),
    "auditLogs/provisioning": frozenset({"eq", "gt", "lt"}),
}
_NEWEST_FIRST_BY_DEFAULT = frozenset({"auditLogs/signIns"})  # the only log whose default order is documented
_MAX_LOG_PAGE = 1000  # the largest (and default) page of the reporting APIs
_FILTER_CLAUSE = re.compile(r"\s*(\w+)\s+(eq|ge|gt|le|lt)\s+(\S+)\s*", re.IGNORECASE)
_GRAPH_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,7}))?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)
_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "eq": lambda a, b: a == b,
    "ge": lambda a, b: a >= b,
    "gt": lambda a, b: a > b,
    "le": lambda a, b: a <= b,
    "lt": lambda a, b: a < b,
}
_DUPLICATE_EVERY = 4  # with duplicate_records, every 4th record of a round is sent again later
_CONTENT_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
_DIAGNOSTIC = json.dumps(
    {
        "ServerInfo": {
            "DataCenter": "West Europe",
            "Slice": "E",
            "Ring": "5",
            "ScaleUnit": "003",
            "RoleInstance": "AM2PEPF0000FAKE",
        }
    },
    separators=(",", ":"),
)
_EXPIRED_TOKEN_MESSAGE = "Access token has expired or is not yet valid."
_THROTTLED_MESSAGE = "Too many requests. Please try again later."


# -- public records ----------------------------------------------------------------------


@dataclass(frozen=True)
class GraphRequest:
    """One request as the fake saw and answered it.

    ``headers`` has lower-cased names (and includes ``authorization``: the fake never logs
    it, the records are for assertions only); ``query`` maps each parameter to its first
    value, ``$`` kept (``{"$select": "id,displayName"}``); ``tenant`` is the tenant the
    bearer token was issued for as Entra recorded it, or None if there was no known token.
    """

    time: float
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    tenant: str | None
    status: int


# -- internal state ----------------------------------------------------------------------


@dataclass
class _Collection:
    """One tenant's objects of one resource, plus the change log delta rounds are cut from.

    ``log`` is append-only; a change's sequence number is its index + 1, so ``len(log)`` is
    the position a deltaLink remembers.  Entries are ``(kind, id, data)``:
    ``("full", id, None)`` added or restored, ``("props", id, frozenset)`` updated,
    ``("removed", id, reason)``, ``("member", group_id, (member_id, removed))``, ``("owner", group_id, (owner_id,
    removed))``, ``("manager", user_id, previous manager id or None)``.
    """

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)  # group id -> member ids
    owners: dict[str, set[str]] = field(default_factory=dict)  # group id -> owner ids
    managers: dict[str, str] = field(default_factory=dict)  # user id -> manager id
    soft_deleted: dict[str, tuple[dict[str, Any], set[str] | None]] = field(default_factory=dict)
    log: list[tuple[str, str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Item:
    """One record of a round, rendered when its page is served.

    ``props`` None means "all selected properties"; a set means only those (minimal mode).
    ``members`` becomes ``members@delta``: ``(member_id, removed)`` pairs; ``manager`` becomes
    ``manager@delta``: one ``(manager_id, removed)`` pair; ``owners`` becomes ``owners@delta`` like members.
    """

    id: str
    removed: str | None = None
    props: frozenset[str] | None = None
    members: tuple[tuple[str, bool], ...] | None = None
    manager: tuple[str, bool] | None = None
    owners: tuple[tuple[str, bool], ...] | None = None


@dataclass
class _Round:
    """A listing or delta round whose pages are fixed when it starts; see the module doc."""

    tenant: str  # tenant key (GUID)
    resource: str
    delta: bool
    select: tuple[str, ...] | None
    expand_members: bool
    items: list[str | _Item]  # a bare id is a full object without members
    page_size: int
    empty_pages: bool
    seq: int  # change-log position at the round's start, for the deltaLink
    generation: int
    links: frozenset[str] = frozenset()  # relationships a delta round tracks: "members" or "manager"

    @property
    def pages(self) -> int:
        data_pages = max(1, math.ceil(len(self.items) / self.page_size))
        return 2 * data_pages if self.empty_pages else data_pages

    def page_items(self, page: int) -> list[str | _Item]:
        if self.empty_pages:
            if page % 2 == 0:
                return []
            page //= 2
        return self.items[page * self.page_size : (page + 1) * self.page_size]


@dataclass(frozen=True)
class _Fault:
    status: int
    body: bytes | None  # None: a Graph throttling error, rendered with the request's ids
    headers: Mapping[str, str]
    tenant: str | None  # tenant key, or None for "whichever request comes next"


@dataclass
class _Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class _GraphError(Exception):
    """Raised inside request handling; becomes a Graph-shaped error reply."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


# -- the fake ----------------------------------------------------------------------------


def _at_least_one(name: str, *, optional: bool = False) -> Callable[[int | None], None]:
    def check(value: int | None) -> None:
        if (value is None and not optional) or (value is not None and value < 1):
            raise ValueError(f"{name} must be {'None or ' if optional else ''}at least 1")

    return check


class FakeGraph(LoopbackHttpsServer):
    """A started-on-demand HTTPS server that behaves like Microsoft Graph collections.

    The directory (:meth:`add`, :meth:`update`, :meth:`delete`, ...) and every knob may be
    changed from the test thread while the server runs; a knob that shapes a round
    (``duplicate_records``, ``empty_pages``, ``members_chunk``, ``page_size``) applies to
    rounds started afterwards.  ``tenant`` arguments accept a domain name or a GUID.

    A request's tenant is the one its bearer token was issued for.  By default that is
    looked up in ``entra.token_requests()`` (and remembered), so call ``FakeEntra.reset()``
    only after a token's first use here -- or pass ``token_tenant`` to decide it yourself.
    """

    def __init__(
        self,
        ca: trustme.CA,
        entra: FakeEntra,
        *,
        page_size: int = 100,
        host: str = "127.0.0.1",
        port: int = 0,
        token_tenant: Callable[[str], str | None] | None = None,
    ) -> None:
        super().__init__(ca, _Handler, name="fake-graph", host=host, port=port)
        self._entra = entra
        self._token_tenant = token_tenant or self._tenant_from_entra

        self._lock = threading.RLock()
        self._collections: dict[tuple[str, str], _Collection] = {}
        self._rounds: collections.OrderedDict[str, _Round] = collections.OrderedDict()
        self._faults: list[_Fault] = []
        self._denied: set[tuple[str, str]] = set()
        self._generation = 0
        self._expired_status = 410
        self._expired_code = "syncStateNotFound"
        self._requests: list[GraphRequest] = []
        self._token_tenants: dict[str, str] = {}  # access token -> tenant, as learned from Entra
        self._page_size = page_size
        self._duplicate_records = False
        self._empty_pages = False
        self._members_chunk: int | None = None
        self._slow_pages = 0.0
        self._logs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._log_rounds: collections.OrderedDict[str, tuple[str, str, list[dict[str, Any]], int]] = (
            collections.OrderedDict()
        )
        self._reports_limit: tuple[int, float] | None = None
        self._report_times: dict[str, collections.deque[float]] = {}
        self.subscriptions = FakeSubscriptions(self)  # /v1.0/subscriptions and webhook delivery
        self._latency_seconds = 0.0
        self._storms: dict[str, tuple[float, str]] = {}  # tenant key -> (until, Retry-After)
        self._hangs: dict[str, float] = {}  # tenant key -> until
        self._stopping = threading.Event()  # ends every hang, so stop() does not wait for one
        # Requests being answered now and the most ever, by tenant key and for all tenants together (_ALL).
        self._active: collections.Counter[str] = collections.Counter()
        self._most_active: collections.Counter[str] = collections.Counter()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``https://HOST:PORT``; Graph URLs are ``{base_url}/v1.0/...``."""
        return self.url

    # -- the directory ---------------------------------------------------------------------

    def add(self, tenant: str, resource: str, obj: Mapping[str, Any], *, silently: bool = False) -> None:
        """Create an object (a dict with at least ``id``); for groups, ``members`` is a list of ids, for users
        ``manager`` is the manager's id.

        ``silently``: without a change record, so that no delta round ever reports it (Graph's delta has been
        known to miss changes); only a full listing or a new delta round sees it.
        """
        self.add_many(tenant, resource, [obj], silently=silently)

    def add_many(
        self, tenant: str, resource: str, objs: Iterable[Mapping[str, Any]], *, silently: bool = False
    ) -> None:
        """:meth:`add` for many objects under one lock, so populating 100k users stays quick."""
        with self._lock:
            coll = self._collection(tenant, resource)
            for obj in objs:
                oid = str(obj["id"])
                if oid in coll.objects or oid in coll.soft_deleted:
                    raise ValueError(f"{resource} {oid} already exists in {tenant}")
                stored = dict(obj)
                stored["id"] = oid
                members = stored.pop("members", None)
                if resource in _MEMBER_RESOURCES:
                    coll.members[oid] = {str(m) for m in members or ()}
                elif members is not None:
                    raise ValueError(f"only {sorted(_MEMBER_RESOURCES)} have members")
                manager = stored.pop("manager", None)
                if manager is not None:
                    if resource != "users":
                        raise ValueError("only users have a manager")
                    coll.managers[oid] = str(manager)
                coll.objects[oid] = stored
                if not silently:
                    coll.log.append(("full", oid, None))

    def update(self, tenant: str, resource: str, id: str, **props: Any) -> None:
        """Change properties (None clears one: Graph returns it as null) and record the change."""
        self._change(tenant, resource, id, props, silently=False)

    def silently_change(self, tenant: str, resource: str, id: str, **props: Any) -> None:
        """Change properties WITHOUT a change record: only a full listing or a new delta round sees it.

        Real Graph has been known to miss changes in delta; a sync that never does a full
        resync would keep the stale value forever, which is what this lets a test show.
        """
        self._change(tenant, resource, id, props, silently=True)

    def delete(self, tenant: str, resource: str, id: str, *, soft: bool = True, silently: bool = False) -> None:
        """Delete an object: soft (restorable; delta says reason "changed") or hard ("deleted").

        Hard-deleting a soft-deleted object purges it, as emptying the recycle bin does. ``silently``: no delta
        round ever reports it (see :meth:`add`).
        """
        with self._lock:
            coll = self._collection(tenant, resource)
            if id in coll.objects:
                obj = coll.objects.pop(id)
                members = coll.members.pop(id, None)
                if soft:
                    coll.soft_deleted[id] = (obj, members)
            elif id in coll.soft_deleted and not soft:
                del coll.soft_deleted[id]
            else:
                raise KeyError(f"{resource} {id} does not exist (or is already soft-deleted) in {tenant}")
            if not soft:
                coll.managers.pop(id, None)
                coll.owners.pop(id, None)
            if not silently:
                coll.log.append(("removed", id, "changed" if soft else "deleted"))

    def restore(self, tenant: str, resource: str, id: str) -> None:
        """Bring a soft-deleted object back, with its members; delta shows it as a full object."""
        with self._lock:
            coll = self._collection(tenant, resource)
            if id not in coll.soft_deleted:
                raise KeyError(f"{resource} {id} is not soft-deleted in {tenant}")
            obj, members = coll.soft_deleted.pop(id)
            coll.objects[id] = obj
            if members is not None:
                coll.members[id] = members
            coll.log.append(("full", id, None))

    def add_members(
        self, tenant: str, group_id: str, member_ids: Iterable[str], *, silently: bool = False, resource: str = "groups"
    ) -> None:
        """Add users to a group (already-present members are ignored, as Graph would refuse them), or with
        ``resource="directoryRoles"`` to a directory role.

        ``silently``: no delta round ever reports it (see :meth:`add`).
        """
        self._change_members(tenant, group_id, member_ids, removed=False, silently=silently, resource=resource)

    def set_owners(self, tenant: str, group_id: str, owner_ids: Iterable[str]) -> None:
        """Make ``owner_ids`` the group's owners: adds and removals that ``owners@delta`` reports."""
        with self._lock:
            coll = self._collection(tenant, "groups")
            if group_id not in coll.objects:
                raise KeyError(f"group {group_id} does not exist in {tenant}")
            owners, wanted = coll.owners.setdefault(group_id, set()), set(map(str, owner_ids))
            for oid in sorted(owners ^ wanted):
                coll.log.append(("owner", group_id, (oid, oid in owners)))
            coll.owners[group_id] = wanted

    def owners(self, tenant: str) -> dict[str, list[str]]:
        """Each live group's owner ids, sorted, for assertions."""
        with self._lock:
            coll = self._collections.get(self._key(tenant, "groups"))
            return {} if coll is None else {g: sorted(coll.owners.get(g, ())) for g in coll.objects}

    def remove_members(
        self, tenant: str, group_id: str, member_ids: Iterable[str], *, silently: bool = False, resource: str = "groups"
    ) -> None:
        """Remove users from a group or (``resource``) a directory role (absent members are ignored).

        ``silently``: the removal never appears in ``members@delta``, as Graph's docs-contrib tracker reports
        happening; only a full listing or a new delta round sees it.
        """
        self._change_members(tenant, group_id, member_ids, removed=True, silently=silently, resource=resource)

    def set_manager(self, tenant: str, user_id: str, manager_id: str | None, *, silently: bool = False) -> None:
        """Set or (with None) remove a user's manager; ``silently``: no delta round reports it (see :meth:`add`)."""
        with self._lock:
            coll = self._collection(tenant, "users")
            if user_id not in coll.objects:
                raise KeyError(f"user {user_id} does not exist in {tenant}")
            previous = coll.managers.get(user_id)
            if previous == manager_id:
                return
            if manager_id is None:
                del coll.managers[user_id]
            else:
                coll.managers[user_id] = manager_id
            if not silently:
                coll.log.append(("manager", user_id, previous))

    def managers(self, tenant: str) -> dict[str, str]:
        """Each live user's manager id (users without one are absent), for assertions."""
        with self._lock:
            coll = self._collections.get(self._key(tenant, "users"))
            return {} if coll is None else {u: m for u, m in coll.managers.items() if u in coll.objects}

    def objects(self, tenant: str, resource: str) -> dict[str, dict[str, Any]]:
        """The current truth without deleted objects, for assertions; groups get ``members`` (sorted ids).

        Copies are shallow: don't mutate nested values.
        """
        with self._lock:
            coll = self._collections.get(self._key(tenant, resource))
            if coll is None:
                return {}
            result = {oid: dict(obj) for oid, obj in coll.objects.items()}
            if resource in _MEMBER_RESOURCES:
                for oid, obj in result.items():
                    obj["members"] = sorted(coll.members.get(oid, ()))
            return result

    def add_log_records(self, tenant: str, resource: str, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records (each with ``id`` and the log's timestamp, e.g. ``createdDateTime``) to a log.

        A record whose timestamp is older than others already there is a late arrival, as Graph's sign-in and
        audit logs have: it shows up in every later query whose time filter covers it.
        """
        time_property = LOG_TIMES[resource]
        with self._lock:
            log = self._logs.setdefault(self._key(tenant, resource), {})
            for record in records:
                _log_time(record, time_property)  # a record the fake could not filter is a test bug
                if str(record["id"]) in log:
                    raise ValueError(f"{resource} record {record['id']} already exists in {tenant}")
                log[str(record["id"])] = dict(record)

    def log_records(self, tenant: str, resource: str) -> dict[str, dict[str, Any]]:
        """Every record of a log, by id, for assertions."""
        with self._lock:
            return {rid: dict(record) for rid, record in self._logs.get(self._key(tenant, resource), {}).items()}

    def soft_deleted(self, tenant: str, resource: str) -> dict[str, dict[str, Any]]:
        """Soft-deleted (restorable) objects, like Graph's ``directory/deletedItems``."""
        with self._lock:
            coll = self._collections.get(self._key(tenant, resource))
            return {} if coll is None else {oid: dict(obj) for oid, (obj, _) in coll.soft_deleted.items()}

    def _ids(self, tenant: str, resource: str) -> tuple[list[str], list[str]]:
        """Live and soft-deleted ids in insertion order (deterministic, no copies of objects), for :func:`mutate`."""
        with self._lock:
            coll = self._collections.get(self._key(tenant, resource))
            return ([], []) if coll is None else (list(coll.objects), list(coll.soft_deleted))

    def _members(self, tenant: str, group_id: str) -> list[str]:
        """One group's member ids, sorted, for :func:`mutate`."""
        with self._lock:
            coll = self._collections.get(self._key(tenant, "groups"))
            return sorted(coll.members.get(group_id, ())) if coll else []

    # -- knobs -----------------------------------------------------------------------------

    page_size: Knob[int] = Knob("Objects per page.", check=_at_least_one("page_size"))

    duplicate_records: Knob[bool] = Knob(
        "Send some records of a delta round again on a later page (the later copy is current)."
    )

    empty_pages: Knob[bool] = Knob("Put an empty page (still with a nextLink) before every page of a round.")

    members_chunk: Knob[int | None] = Knob(
        "Split a group's ``members@delta`` into records of at most N; later chunks go to the round's end.",
        check=_at_least_one("members_chunk", optional=True),
    )

    slow_pages: Knob[float] = Knob("Seconds to sleep before serving each page, e.g. to signal the daemon mid-sync.")

    @property
    def reports_limit(self) -> tuple[int, float] | None:
        """``(requests, seconds)``: the log endpoints' rate per tenant; beyond it, 429 with ``Retry-After``.

        Graph's identity and access reports allow 5 requests per 10 seconds per app and tenant. None (the default)
        means no limit, so that tests not about throttling stay fast.
        """
        with self._lock:
            return self._reports_limit

    @reports_limit.setter
    def reports_limit(self, value: tuple[int, float] | None) -> None:
        with self._lock:
            self._reports_limit = value
            self._report_times.clear()

    latency_seconds: Knob[float] = Knob(
        "Seconds every request waits before it is answered (faults and errors too), as a distant Graph would."
    )

    def throttle_for(self, tenant: str, seconds: float, *, retry_after: str = "60") -> None:
        """Answer every request of ``tenant`` with 429 and ``Retry-After`` for the next ``seconds``: a storm."""
        with self._lock:
            self._storms[tenant_id(tenant)] = (time.time() + seconds, retry_after)

    def hang(self, tenant: str, seconds: float) -> None:
        """Hold every request of ``tenant`` that arrives in the next ``seconds`` unanswered until they have passed
        (or the fake stops), as a Graph that accepted the connection but does not answer."""
        with self._lock:
            self._hangs[tenant_id(tenant)] = time.time() + seconds

    def max_concurrent_requests(self, tenant: str | None = None) -> int:
        """The most requests of ``tenant`` (of all tenants together: ``None``) answered at once so far."""
        with self._lock:
            return self._most_active[_ALL if tenant is None else tenant_id(tenant)]

    def throttle_next(
        self, count: int, *, status: int = 429, retry_after: str = "2", tenant: str | None = None
    ) -> None:
        """Answer the next ``count`` requests (of ``tenant``, if given) with a throttling error.

        Faults come before authentication and routing, as a front-door throttle would.
        """
        with self._lock:
            key = tenant_id(tenant) if tenant is not None else None
            self._faults.extend([_Fault(status, None, {"Retry-After": retry_after}, key)] * count)

    def fail_next(
        self,
        count: int,
        *,
        status: int = 200,
        body: bytes = b'{"value": [{"id": "x"',
        tenant: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (of ``tenant``, if given) with ``status`` and ``body`` verbatim.

        The default is a 200 whose JSON is cut off, like a connection dropped mid-page.
        """
        with self._lock:
            key = tenant_id(tenant) if tenant is not None else None
            self._faults.extend([_Fault(status, body, {}, key)] * count)

    def expire_delta_tokens(self, *, status: int = 410, code: str = "syncStateNotFound") -> None:
        """Invalidate every delta token and delta-round skiptoken issued so far.

        Using one then gets ``status`` (410, or 400 as some services answer) with error
        ``code`` and a ``Location`` header pointing at a fresh delta start.
        """
        with self._lock:
            self._generation += 1
            self._expired_status = status
            self._expired_code = code

    def deny(self, tenant: str, resource: str) -> None:
        """Answer 403 Authorization_RequestDenied for ``resource`` in ``tenant``, as without consent."""
        with self._lock:
            self._denied.add(self._key(tenant, resource))

    def allow(self, tenant: str, resource: str) -> None:
        """Undo :meth:`deny`."""
        with self._lock:
            self._denied.discard(self._key(tenant, resource))

    # -- records ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[GraphRequest]:
        """Requests so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def reset_records(self) -> None:
        """Forget recorded requests and concurrency maxima; the directory, tokens and pending faults are kept."""
        with self._lock:
            self._requests.clear()
            self._most_active.clear()

    def stop(self) -> None:
        self._stopping.set()
        super().stop()
        self._stopping.clear()

    # -- directory internals ---------------------------------------------------------------

    @staticmethod
    def _key(tenant: str, resource: str) -> tuple[str, str]:
        return tenant_id(tenant), resource

    def _collection(self, tenant: str, resource: str) -> _Collection:
        """The collection for (tenant, resource), created empty on first use.  Call under the lock."""
        key = self._key(tenant, resource)
        coll = self._collections.get(key)
        if coll is None:
            coll = self._collections[key] = _Collection()
        return coll

    def _change(self, tenant: str, resource: str, id: str, props: Mapping[str, Any], *, silently: bool) -> None:
        if "id" in props or "members" in props:
            raise ValueError("id cannot change, and members change through add_members/remove_members")
        with self._lock:
            coll = self._collection(tenant, resource)
            if id not in coll.objects:
                raise KeyError(f"{resource} {id} does not exist in {tenant}")
            # Copy-on-write: records rendered earlier may still reference the old dict.
            coll.objects[id] = {**coll.objects[id], **props}
            if not silently and props:
                coll.log.append(("props", id, frozenset(props)))

    def _change_members(
        self, tenant: str, group_id: str, member_ids: Iterable[str], *, removed: bool, silently: bool, resource: str
    ) -> None:
        with self._lock:
            coll = self._collection(tenant, resource)
            if group_id not in coll.objects:
                raise KeyError(f"group {group_id} does not exist in {tenant}")
            members = coll.members.setdefault(group_id, set())
            for raw in member_ids:
                mid = str(raw)
                if (mid in members) != removed:
                    continue
                if removed:
                    members.discard(mid)
                else:
                    members.add(mid)
                if not silently:
                    coll.log.append(("member", group_id, (mid, removed)))

    def _tenant_from_entra(self, access_token: str) -> str | None:
        """Which tenant Entra issued ``access_token`` for, from its public token records.

        Learned mappings are cached, so a ``FakeEntra.reset()`` after a token's first use
        here does not lose it.
        """
        with self._lock:
            known = self._token_tenants.get(access_token)
        if known is not None:
            return known
        for record in self._entra.token_requests():
            if record.access_token is not None:
                with self._lock:
                    self._token_tenants[record.access_token] = record.tenant
        with self._lock:
            return self._token_tenants.get(access_token)

    # -- request handling (server threads) -------------------------------------------------

    def _handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes = b"") -> _Reply:
        received = time.time()
        split = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        token = _bearer(headers.get("authorization"))
        tenant = self._token_tenant(token) if token else None
        request_id = str(uuid.uuid4())
        client_request_id = headers.get("client-request-id") or request_id
        key = tenant_id(tenant) if tenant is not None else None
        try:
            with self._answering(key):
                reply = (
                    self._storm(key, request_id, client_request_id)
                    or self._fault(tenant, request_id, client_request_id)
                    or self._serve(method, split.path, query, headers, token, tenant, body)
                )
        except _GraphError as exc:
            reply = _Reply(exc.status, _error_body(exc.code, exc.message, request_id, client_request_id), exc.headers)
        except Exception:  # a bug in the fake must still produce an answer the test can see
            logger.exception("fake Graph: error handling %s %s", method, target)
            reply = _Reply(
                500,
                _error_body("generalException", "Fake Graph internal error.", request_id, client_request_id),
            )
        reply.headers.setdefault("Content-Type", _CONTENT_TYPE)
        reply.headers["request-id"] = request_id
        reply.headers["client-request-id"] = client_request_id
        reply.headers["x-ms-ags-diagnostic"] = _DIAGNOSTIC
        reply.headers["Strict-Transport-Security"] = "max-age=31536000"
        reply.headers["Cache-Control"] = "no-cache"
        record = GraphRequest(
            time=received,
            method=method,
            path=unquote(split.path),
            query=query,
            headers=dict(headers),
            tenant=tenant,
            status=reply.status,
        )
        with self._lock:
            self._requests.append(record)
        logger.debug("fake Graph: %s %s tenant=%s -> %s", method, split.path, tenant, reply.status)
        return reply

    @contextlib.contextmanager
    def _answering(self, key: str | None) -> Iterator[None]:
        """Count the request as being answered (for :meth:`max_concurrent_requests`) while it waits and is served."""
        counted = (_ALL,) if key is None else (key, _ALL)
        with self._lock:
            for name in counted:
                self._active[name] += 1
                self._most_active[name] = max(self._most_active[name], self._active[name])
            latency = self._latency_seconds
            hang_until = self._hangs.get(key, 0.0) if key is not None else 0.0
        try:
            if latency > 0:
                time.sleep(latency)
            if hang_until > time.time():
                self._stopping.wait(hang_until - time.time())
            yield
        finally:
            with self._lock:
                for name in counted:
                    self._active[name] -= 1

    def _storm(self, key: str | None, request_id: str, client_request_id: str) -> _Reply | None:
        with self._lock:
            until, retry_after = self._storms.get(key, (0.0, "")) if key is not None else (0.0, "")
        if time.time() >= until:
            return None
        body = _error_body("TooManyRequests", _THROTTLED_MESSAGE, request_id, client_request_id)
        return _Reply(429, body, {"Retry-After": retry_after})

    def _fault(self, tenant: str | None, request_id: str, client_request_id: str) -> _Reply | None:
        key = tenant_id(tenant) if tenant is not None else None
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.tenant is None or fault.tenant == key:
                    del self._faults[index]
                    break
            else:
                return None
        body = fault.body
        if body is None:
            body = _error_body("TooManyRequests", _THROTTLED_MESSAGE, request_id, client_request_id)
        return _Reply(fault.status, body, dict(fault.headers))

    def _serve(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        token: str | None,
        tenant: str | None,
        body: bytes = b"",
    ) -> _Reply:
        if not token:
            raise _GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        if tenant is None or not self._entra.is_valid(token):
            raise _GraphError(401, "InvalidAuthenticationToken", _EXPIRED_TOKEN_MESSAGE)
        parts = [unquote(p) for p in path.split("/") if p]
        if not parts or parts[0] != "v1.0":
            raise _GraphError(400, "BadRequest", f"Invalid version: {parts[0] if parts else ''}")
        if len(parts) < 2 or len(parts) > 3:
            raise _GraphError(400, "BadRequest", f"Resource not found for the segment '{path}'.")
        if parts[1] == "subscriptions":
            try:
                status, answer = self.subscriptions.answer(method, parts[2:], body, tenant_id(tenant))
            except SubscriptionError as exc:
                raise _GraphError(exc.status, exc.code, exc.message) from None
            return _Reply(status, b"" if answer is None else _json(answer))
        if method != "GET":
            raise _GraphError(405, "Request_BadRequest", f"The HTTP method '{method}' is not supported here.")
        tkey = tenant_id(tenant)
        if "/".join(parts[1:]) in LOG_TIMES:
            return self._log_page(tkey, "/".join(parts[1:]), query)
        resource = parts[1]
        with self._lock:
            denied = (tkey, resource) in self._denied
        if denied:
            raise _GraphError(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
        if len(parts) == 3 and parts[2] not in _DELTA_SEGMENTS:
            return self._get_one(tkey, resource, parts[2], query)
        delta = len(parts) == 3
        with self._lock:
            slow = self._slow_pages
        if slow > 0:
            time.sleep(slow)
        minimal = delta and _prefers_minimal(headers.get("prefer"))
        reply = self._page(tkey, resource, delta, query, minimal)
        if minimal:
            reply.headers["Preference-Applied"] = "return=minimal"
        return reply

    def _log_page(self, tkey: str, resource: str, query: Mapping[str, str]) -> _Reply:
        """One page of a log read by time, newest first; the records are fixed when its first page is asked for."""
        with self._lock:
            denied = (tkey, resource) in self._denied
        if denied:
            raise _GraphError(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
        self._count_report_request(tkey)
        skiptoken = query.get("$skiptoken")
        if skiptoken is not None:
            state = _decode(skiptoken) or {}
            with self._lock:
                log_round = self._log_rounds.get(str(state.get("l")))
            page = state.get("p")
            if log_round is None or not isinstance(page, int) or log_round[:2] != (tkey, resource):
                raise _GraphError(400, "Directory_ExpiredPageToken", "The specified page token value has expired.")
            round_id = str(state["l"])
        else:
            time_property = LOG_TIMES[resource]
            bounds = _time_filter(query.get("$filter"), time_property, _LOG_OPERATORS[resource])
            newest_first = _log_order(query.get("$orderby"), time_property, resource in _NEWEST_FIRST_BY_DEFAULT)
            select = _parse_select(query.get("$select"))
            top = query.get("$top")
            page_size = min(_positive_int(top, "$top"), _MAX_LOG_PAGE) if top else min(self.page_size, _MAX_LOG_PAGE)
            with self._lock:
                timed = [
                    (_log_time(record, time_property), dict(record))
                    for record in self._logs.get((tkey, resource), {}).values()
                ]
            timed = [(at, record) for at, record in timed if all(_COMPARE[op](at, bound) for op, bound in bounds)]
            timed.sort(key=lambda item: (item[0], item[1]["id"]), reverse=newest_first)
            records = [
                {key: value for key, value in record.items() if select is None or key in select or key == "id"}
                for _, record in timed
            ]
            round_id, page, log_round = secrets.token_urlsafe(12), 0, (tkey, resource, records, page_size)
            with self._lock:
                self._log_rounds[round_id] = log_round
                while len(self._log_rounds) > _MAX_ROUNDS:
                    self._log_rounds.popitem(last=False)
        records, page_size = log_round[2], log_round[3]
        body: dict[str, Any] = {
            "@odata.context": self._context(resource, None),
            "value": records[page * page_size : (page + 1) * page_size],
        }
        if (page + 1) * page_size < len(records):
            token = _encode({"l": round_id, "p": page + 1})
            body["@odata.nextLink"] = f"{self._collection_url(resource, False)}?$skiptoken={token}"
        return _Reply(200, _json(body))

    def _count_report_request(self, tkey: str) -> None:
        """Refuse the request with 429 and a ``Retry-After`` if it would exceed :attr:`reports_limit`."""
        with self._lock:
            if self._reports_limit is None:
                return
            limit, seconds = self._reports_limit
            times = self._report_times.setdefault(tkey, collections.deque())
            now = time.monotonic()
            while times and now - times[0] >= seconds:
                times.popleft()
            if len(times) >= limit:
                wait = max(1, math.ceil(seconds - (now - times[0])))
                raise _GraphError(429, "TooManyRequests", _THROTTLED_MESSAGE, {"Retry-After": str(wait)})
            times.append(now)

    def _get_one(self, tkey: str, resource: str, oid: str, query: Mapping[str, str]) -> _Reply:
        select = _parse_select(query.get("$select"))
        with self._lock:
            coll = self._collections.get((tkey, resource))
            obj = coll.objects.get(oid) if coll else None
            if coll is None or obj is None:
                raise _GraphError(
                    404,
                    "Request_ResourceNotFound",
                    f"Resource '{oid}' does not exist or one of its queried reference-property objects "
                    "are not present.",
                )
            record = _render(obj, select, None)
            if query.get("$expand") == "members" and resource in _MEMBER_RESOURCES:
                record["members"] = [{"@odata.type": MEMBER_TYPE, "id": m} for m in sorted(coll.members.get(oid, ()))]
        record = {"@odata.context": f"{self.base_url}/v1.0/$metadata#{resource}/$entity", **record}
        return _Reply(200, _json(record))

    def _page(self, tkey: str, resource: str, delta: bool, query: Mapping[str, str], minimal: bool) -> _Reply:
        skiptoken = query.get("$skiptoken")
        deltatoken = query.get("$deltatoken")
        if skiptoken is not None:
            round_id, page, rnd = self._resume(tkey, resource, delta, skiptoken, query)
        elif delta and deltatoken == "latest":
            with self._lock:
                seq = len(self._collection_by_key(tkey, resource).log)
                generation = self._generation
            select = _parse_select(query.get("$select"))
            latest = _Round(tkey, resource, True, select, False, [], 1, False, seq, generation, _links(resource, query))
            body = {
                "@odata.context": self._context(resource, select),
                "value": [],
                "@odata.deltaLink": self._delta_link(latest, seq, generation),
            }
            return _Reply(200, _json(body))
        elif delta and deltatoken is not None:
            round_id, rnd = self._start_changes(tkey, resource, deltatoken, query, minimal)
            page = 0
        else:
            round_id, rnd = self._start_round(tkey, resource, delta, query)
            page = 0

        with self._lock:
            coll = self._collection_by_key(tkey, resource)
            values = [r for r in (self._render_item(coll, rnd, item) for item in rnd.page_items(page)) if r]
        body: dict[str, Any] = {"@odata.context": self._context(resource, rnd.select), "value": values}
        if page + 1 < rnd.pages:
            token = _encode({"r": round_id, "p": page + 1})
            body["@odata.nextLink"] = f"{self._collection_url(resource, delta)}?$skiptoken={token}"
        elif delta:
            body["@odata.deltaLink"] = self._delta_link(rnd, rnd.seq, rnd.generation)
        return _Reply(200, _json(body))

    def _collection_by_key(self, tkey: str, resource: str) -> _Collection:
        coll = self._collections.get((tkey, resource))
        if coll is None:
            coll = self._collections[(tkey, resource)] = _Collection()
        return coll

    def _collection_url(self, resource: str, delta: bool) -> str:
        return f"{self.base_url}/v1.0/{quote(resource)}" + ("/delta" if delta else "")

    def _context(self, resource: str, select: tuple[str, ...] | None) -> str:
        return f"{self.base_url}/v1.0/$metadata#{resource}" + (f"({','.join(select)})" if select else "")

    def _delta_link(self, rnd: _Round, seq: int, generation: int) -> str:
        state = {"t": rnd.tenant, "r": rnd.resource, "s": list(rnd.select) if rnd.select else None, "q": seq}
        token = _encode({**state, "g": generation, "x": sorted(rnd.links)})
        return f"{self._collection_url(rnd.resource, True)}?$deltatoken={token}"

    def _fresh_start(self, resource: str, select: tuple[str, ...] | None) -> str:
        url = self._collection_url(resource, True)
        return f"{url}?$select={','.join(select)}" if select else url

    def _expired(self, resource: str, select: tuple[str, ...] | None) -> _GraphError:
        with self._lock:
            status, code = self._expired_status, self._expired_code
        return _GraphError(
            status,
            code,
            "The delta token or skip token is no longer valid. Restart the sync from the URL in the Location header.",
            {"Location": self._fresh_start(resource, select)},
        )

    def _register(self, rnd: _Round) -> str:
        round_id = secrets.token_urlsafe(12)
        with self._lock:
            self._rounds[round_id] = rnd
            while len(self._rounds) > _MAX_ROUNDS:
                self._rounds.popitem(last=False)
        return round_id

    def _resume(
        self, tkey: str, resource: str, delta: bool, skiptoken: str, query: Mapping[str, str]
    ) -> tuple[str, int, _Round]:
        state = _decode(skiptoken)
        round_id = state.get("r") if state else None
        page = state.get("p") if state else None
        with self._lock:
            rnd = self._rounds.get(round_id) if isinstance(round_id, str) else None
            generation = self._generation
        if rnd is None or not isinstance(page, int) or not 0 <= page < rnd.pages:
            if delta:
                raise self._expired(resource, _parse_select(query.get("$select")))
            raise _GraphError(400, "Directory_ExpiredPageToken", "The specified page token value has expired.")
        if rnd.tenant != tkey or rnd.resource != resource or rnd.delta != delta:
            raise _GraphError(400, "BadRequest", "The skip token does not belong to this request.")
        if delta and rnd.generation != generation:
            raise self._expired(resource, rnd.select)
        return round_id, page, rnd

    def _start_round(self, tkey: str, resource: str, delta: bool, query: Mapping[str, str]) -> tuple[str, _Round]:
        """A listing or the first round of a delta sync: every current object, once (plus knobs)."""
        select = _parse_select(query.get("$select"))
        links = _links(resource, query) if delta else frozenset()
        with_members = "members" in links
        with self._lock:
            coll = self._collection_by_key(tkey, resource)
            if delta:
                page_size, dup, chunk = self._page_size, self._duplicate_records, self._members_chunk
                empty = self._empty_pages
            else:
                top = query.get("$top")
                page_size = min(_positive_int(top, "$top"), MAX_PAGE_SIZE) if top else self._page_size
                dup, empty, chunk = False, self._empty_pages, None
            items: list[str | _Item]
            if with_members or "owners" in links:
                items = [
                    _Item(
                        oid,
                        members=tuple((m, False) for m in sorted(coll.members.get(oid, ()))) if with_members else None,
                        owners=tuple((o, False) for o in sorted(coll.owners.get(oid, ())))
                        if "owners" in links
                        else None,
                    )
                    for oid in coll.objects
                ]
            elif "manager" in links:
                items = [
                    _Item(oid, manager=(coll.managers[oid], False)) if oid in coll.managers else oid
                    for oid in coll.objects
                ]
            else:
                items = list(coll.objects)
            seq, generation = len(coll.log), self._generation
        items = _shape(items, chunk, dup)
        rnd = _Round(
            tenant=tkey,
            resource=resource,
            delta=delta,
            select=select,
            expand_members=not delta and query.get("$expand") == "members" and resource in _MEMBER_RESOURCES,
            items=items,
            page_size=page_size,
            empty_pages=empty,
            seq=seq,
            generation=generation,
            links=links,
        )
        return self._register(rnd), rnd

    def _start_changes(
        self, tkey: str, resource: str, deltatoken: str, query: Mapping[str, str], minimal: bool
    ) -> tuple[str, _Round]:
        """A later delta round: one record per object changed since the token's position."""
        state = _decode(deltatoken)
        select = _parse_select(query.get("$select"))
        if state is None or state.get("t") != tkey or state.get("r") != resource or not isinstance(state.get("q"), int):
            raise self._expired(resource, select)
        select = tuple(state["s"]) if state.get("s") else None
        links = frozenset(state.get("x") or ())
        with_members = "members" in links
        with self._lock:
            if state.get("g") != self._generation:
                raise self._expired(resource, select)
            coll = self._collection_by_key(tkey, resource)
            seq = state["q"]
            if not 0 <= seq <= len(coll.log):
                raise self._expired(resource, select)
            window = coll.log[seq:]
            end, generation = len(coll.log), self._generation
            page_size, dup, chunk = self._page_size, self._duplicate_records, self._members_chunk
            empty = self._empty_pages

            full: set[str] = set()
            props: dict[str, set[str]] = {}
            member_changes: dict[str, dict[str, bool]] = {}
            owner_changes: dict[str, dict[str, bool]] = {}
            manager_before: dict[str, str | None] = {}  # the manager before the last change in the window
            order: dict[str, None] = {}
            for kind, oid, data in window:
                order.setdefault(oid)
                if kind == "full":
                    full.add(oid)
                elif kind == "props":
                    props.setdefault(oid, set()).update(data)
                elif kind in ("member", "owner"):
                    mid, removed = data
                    (member_changes if kind == "member" else owner_changes).setdefault(oid, {})[mid] = removed
                elif kind == "manager":
                    manager_before[oid] = data

            items: list[str | _Item] = []
            for oid in order:
                if oid not in coll.objects:
                    reason = "changed" if oid in coll.soft_deleted else "deleted"
                    items.append(_Item(oid, removed=reason))
                    continue
                members: tuple[tuple[str, bool], ...] | None = None
                if with_members:
                    changes = dict(member_changes.get(oid, {}))
                    if oid in full:  # new or restored: the client has no membership for it
                        changes = {m: r for m, r in changes.items() if r}
                        changes.update(dict.fromkeys(coll.members.get(oid, ()), False))
                    members = tuple(sorted(changes.items())) or None
                owners: tuple[tuple[str, bool], ...] | None = None
                if "owners" in links:
                    moved = dict(owner_changes.get(oid, {}))
                    if oid in full:
                        moved = {o: r for o, r in moved.items() if r} | dict.fromkeys(coll.owners.get(oid, ()), False)
                    owners = tuple(sorted(moved.items())) or None
                manager: tuple[str, bool] | None = None
                if "manager" in links and (oid in full or oid in manager_before):
                    current, before = coll.managers.get(oid), manager_before.get(oid)
                    manager = (current, False) if current else (before, True) if before and oid not in full else None
                if oid in full:
                    items.append(
                        _Item(
                            oid,
                            members=members or (() if with_members else None),
                            manager=manager,
                            owners=owners or (() if "owners" in links else None),
                        )
                    )
                    continue
                changed = props.get(oid, set())
                if select is not None:
                    changed &= set(select)
                if not changed and members is None and manager is None and owners is None:
                    continue  # only unselected properties (or nothing visible) changed
                props_sent = frozenset(changed) if minimal else None
                items.append(_Item(oid, props=props_sent, members=members, manager=manager, owners=owners))
        items = _shape(items, chunk, dup)
        rnd = _Round(
            tenant=tkey,
            resource=resource,
            delta=True,
            select=select,
            expand_members=False,
            items=items,
            page_size=page_size,
            empty_pages=empty,
            seq=end,
            generation=generation,
            links=links,
        )
        return self._register(rnd), rnd

    def _render_item(self, coll: _Collection, rnd: _Round, item: str | _Item) -> dict[str, Any] | None:
        """The JSON record for ``item`` from the current state, or None if it has gone since.  Under the lock."""
        if isinstance(item, str):
            obj = coll.objects.get(item)
            if obj is None:
                return None
            record = _render(obj, rnd.select, None)
            if rnd.expand_members:
                record["members"] = [{"@odata.type": MEMBER_TYPE, "id": m} for m in sorted(coll.members.get(item, ()))]
            return record
        if item.removed is not None:
            return {"id": item.id, "@removed": {"reason": item.removed}}
        obj = coll.objects.get(item.id)
        if obj is None:
            return None  # deleted after the round started; the next round says so
        record = _render(obj, rnd.select, item.props)
        if item.members is not None:
            record["members@delta"] = [_member(mid, removed) for mid, removed in item.members]
        if item.manager is not None:
            record["manager@delta"] = [_member(*item.manager)]
        if item.owners is not None:
            record["owners@delta"] = [_member(oid, removed) for oid, removed in item.owners]
        return record


# -- helpers -------------------------------------------------------------------------------


def _render(obj: Mapping[str, Any], select: tuple[str, ...] | None, props: frozenset[str] | None) -> dict[str, Any]:
    """An object's record: selected properties (unset ones as null), or only ``props`` when minimal."""
    if props is not None:
        names: Iterable[str] = props
    elif select is not None:
        names = select
    else:
        names = obj.keys()
    record = {"id": obj["id"]}
    for name in names:
        if name not in _LINK_NAMES:
            record[name] = obj.get(name)
    return record


def _member(mid: str, removed: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"@odata.type": MEMBER_TYPE, "id": mid}
    if removed:
        entry["@removed"] = {"reason": "deleted"}
    return entry


def _shape(items: list[str | _Item], chunk: int | None, duplicate: bool) -> list[str | _Item]:
    """Apply members_chunk (later chunks move to the end) and duplicate_records (copies at the end)."""
    if chunk is not None:
        head: list[str | _Item] = []
        tail: list[str | _Item] = []
        for item in items:
            if isinstance(item, _Item) and item.members and len(item.members) > chunk:
                parts = [item.members[i : i + chunk] for i in range(0, len(item.members), chunk)]
                head.append(dataclasses.replace(item, members=parts[0]))
                tail.extend(_Item(item.id, props=item.props, members=part) for part in parts[1:])
            else:
                head.append(item)
        items = head + tail
    if duplicate:
        items = items + items[::_DUPLICATE_EVERY]
    return items


def _links(resource: str, query: Mapping[str, str]) -> frozenset[str]:
    """The relationship a delta round on ``resource`` tracks, asked for in ``$select`` or ``$expand``.

    Graph's delta expands only a user's ``manager`` and a group's ``members``: anything else is a 400.
    """
    link = _LINK_OF.get(resource)
    expand = [name.strip() for name in (query.get("$expand") or "").split(",") if name.strip()]
    if any(name != link for name in expand):
        raise _GraphError(
            400, "Request_UnsupportedQuery", f"$expand is supported on {resource}/delta only for {link or 'nothing'}."
        )
    asked = set(expand) | set(_parse_select(query.get("$select")) or ())
    return frozenset({link} if link is not None else set()) & asked | _SELECTED_LINKS.get(resource, frozenset()) & asked


def _ticks(value: str) -> int | None:
    """100-ns ticks since the epoch of a Graph DateTimeOffset (at most 7 fractional digits), or None."""
    match = _GRAPH_TIME.fullmatch(value)
    if match is None:
        return None
    zone = "+00:00" if match[3].upper() == "Z" else match[3]
    seconds = int(datetime.fromisoformat(match[1] + zone).timestamp())
    return seconds * 10_000_000 + int((match[2] or "").ljust(7, "0"))


def _log_time(record: Mapping[str, Any], time_property: str) -> int:
    """A log record's timestamp as Graph compares it: to the 100-ns tick."""
    value = record.get(time_property)
    ticks = _ticks(value) if isinstance(value, str) else None
    if ticks is None:
        raise ValueError(f"a log record needs {time_property} as an ISO-8601 string with a zone")
    return ticks


def _time_filter(value: str | None, time_property: str, operators: frozenset[str]) -> list[tuple[str, int]]:
    """``$filter`` clauses ``<time_property> <operator> <time>`` joined by ``and``, with the log's documented
    operators; anything else is a 400."""
    bounds: list[tuple[str, int]] = []
    for clause in re.split(r"\s+and\s+", value or "", flags=re.IGNORECASE) if value else []:
        match = _FILTER_CLAUSE.fullmatch(clause)
        if match is None or match[1] != time_property or match[2].lower() not in operators:
            raise _GraphError(400, "Request_UnsupportedQuery", f"Unsupported or invalid query filter clause: {clause}")
        bound = _ticks(match[3])
        if bound is None:
            raise _GraphError(400, "Request_BadRequest", f"Invalid DateTimeOffset in filter: {match[3]}")
        bounds.append((match[2].lower(), bound))
    return bounds


def _log_order(value: str | None, time_property: str, newest_first_by_default: bool) -> bool:
    """Whether ``$orderby`` (without it, the log's default order) is newest first; another ``$orderby`` is a 400."""
    if value is None:
        return newest_first_by_default
    name, _, direction = value.strip().partition(" ")
    if name != time_property or direction.strip().lower() not in ("", "asc", "desc"):
        raise _GraphError(400, "Request_UnsupportedQuery", f"Unsupported $orderby: {value}")
    return direction.strip().lower() == "desc"


def _parse_select(value: str | None) -> tuple[str, ...] | None:
    if not value:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    return tuple(dict.fromkeys(n for n in names if n != "id")) or ("id",)


def _positive_int(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise _GraphError(400, "Request_UnsupportedQuery", f"Invalid value '{value}' for {name}.")
    return number


def _prefers_minimal(prefer: str | None) -> bool:
    return bool(prefer) and any(p.strip().lower() == "return=minimal" for p in prefer.split(","))


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _encode(state: Mapping[str, Any]) -> str:
    raw = json.dumps(state, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(token: str) -> dict[str, Any] | None:
    try:
        state = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error):
        return None
    return state if isinstance(state, dict) else None


def _json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _error_body(code: str, message: str, request_id: str, client_request_id: str) -> bytes:
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    inner = {"date": date, "request-id": request_id, "client-request-id": client_request_id}
    return _json({"error": {"code": code, "message": message, "innerError": inner}})


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so stop() really ends service; a pooled
    # keep-alive connection must not keep reaching a "stopped" fake.
    protocol_version = "HTTP/1.0"
    timeout = 30
    server: FakeHttpServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = self.server.fake._handle(self.command, self.path, headers, body)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fake Graph: " + format, *args)


# -- realistic data ------------------------------------------------------------------------

# fmt: off
_FIRST = (
    "Adele", "Alex", "Allan", "Ben", "Bianca", "Carlos", "Chen", "Diego", "Elena", "Emily", "Fatima",
    "Grace", "Hana", "Irvin", "Isaiah", "Johanna", "Joni", "Kenji", "Lee", "Lidia", "Lynne", "Megan",
    "Miriam", "Nestor", "Nora", "Omar", "Patti", "Pradeep", "Priya", "Raul", "Sakura", "Sven", "Tomas",
    "Yuki", "Zara",
)
_LAST = (
    "Vance", "Wilber", "Smith", "Garcia", "Chen", "Kim", "Novak", "Okafor", "Rossi", "Schmidt",
    "Silva", "Tanaka", "Dubois", "Nguyen", "Haddad", "Larsen", "Kowalski", "Murphy", "Patel",
    "Ivanova", "Costa", "Moreau", "Fischer", "Lindqvist", "Sato", "Bauer", "Romero", "Hughes",
    "Jensen", "Quinn",
)
# fmt: on
_TITLES = (
    "Engineer",
    "Senior Engineer",
    "Product Manager",
    "Designer",
    "Sales Representative",
    "Account Manager",
    "Marketing Specialist",
    "HR Generalist",
    "Support Engineer",
    "Director",
    None,
)
_GROUP_WORDS = ("Sales", "Marketing", "Engineering", "Finance", "Legal", "Support", "Research", "Operations", "Design")
_GROUP_KINDS = ("Team", "Leads", "All", "Project", "Guild", "Admins", "Readers", "Contractors")


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _domain(tenant: str) -> str:
    return tenant.lower() if "." in tenant else f"{tenant.lower()}.onmicrosoft.com"


def _new_user(rng: random.Random, tenant: str, serial: int) -> dict[str, Any]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    address = f"{first}.{last}{serial}@{_domain(tenant)}".lower()
    return {
        "id": _guid(rng),
        "displayName": f"{first} {last}",
        "givenName": first,
        "surname": last,
        "mail": address,
        "userPrincipalName": address,
        "jobTitle": rng.choice(_TITLES),
    }


def _new_group(rng: random.Random, serial: int, members: list[str]) -> dict[str, Any]:
    name = f"{rng.choice(_GROUP_WORDS)} {rng.choice(_GROUP_KINDS)} {serial}"
    return {
        "id": _guid(rng),
        "displayName": name,
        "mailNickname": name.lower().replace(" ", "-"),
        "description": f"The {name} group",
        "securityEnabled": True,
        "mailEnabled": False,
        "members": members,
    }


def populate(graph: FakeGraph, tenant: str, users: int, groups: int, seed: int = 0) -> None:
    """Fill ``tenant`` with ``users`` users and ``groups`` groups of random users, reproducibly.

    Shared by tests, the demo and the benchmark so they all exercise the same shape of data.
    """
    rng = random.Random(seed)
    user_objs = [_new_user(rng, tenant, n) for n in range(users)]
    graph.add_many(tenant, "users", user_objs)
    ids = [u["id"] for u in user_objs]
    group_objs = []
    for n in range(groups):
        size = min(len(ids), rng.choice((0, 1, 3, 5, 10, 25, 50)))
        group_objs.append(_new_group(rng, n, rng.sample(ids, size)))
    graph.add_many(tenant, "groups", group_objs)


def mutate(graph: FakeGraph, tenant: str, rng: random.Random, *, changes: int = 20) -> list[str]:
    """Apply exactly ``changes`` random directory changes of every kind delta must report; return what was done.

    The mix: user adds, updates (including cleared properties), soft and hard deletes,
    restores and purges of soft-deleted users, group renames and membership changes.  An
    operation that does not apply (nothing to restore, no groups) is drawn again.  Cost is
    O(directory size) per change, so it is fine for the demo's 100k users too.
    """
    ops = ("add", "update", "clear", "soft", "hard", "restore", "purge", "join", "leave", "rename")
    weights = (12, 25, 5, 8, 4, 8, 3, 15, 12, 8)
    done: list[str] = []
    while len(done) < changes:
        users, bin_ = graph._ids(tenant, "users")
        groups, _ = graph._ids(tenant, "groups")
        op = rng.choices(ops, weights=weights)[0]
        if op == "add" or not users:
            user = _new_user(rng, tenant, rng.randrange(10**6, 10**7))
            graph.add(tenant, "users", user)
            done.append(f"add user {user['id']}")
        elif op == "update":
            uid = rng.choice(users)
            graph.update(tenant, "users", uid, jobTitle=rng.choice(_TITLES[:-1]))
            done.append(f"update user {uid} jobTitle")
        elif op == "clear":
            uid = rng.choice(users)
            graph.update(tenant, "users", uid, jobTitle=None)
            done.append(f"clear user {uid} jobTitle")
        elif op in ("soft", "hard"):
            uid = rng.choice(users)
            graph.delete(tenant, "users", uid, soft=op == "soft")
            done.append(f"{op}-delete user {uid}")
        elif op == "restore" and bin_:
            uid = rng.choice(bin_)
            graph.restore(tenant, "users", uid)
            done.append(f"restore user {uid}")
        elif op == "purge" and bin_:
            uid = rng.choice(bin_)
            graph.delete(tenant, "users", uid, soft=False)
            done.append(f"purge user {uid}")
        elif op == "join" and groups:
            gid = rng.choice(groups)
            new = rng.sample(users, min(len(users), rng.randint(1, 3)))
            graph.add_members(tenant, gid, new)
            done.append(f"add {len(new)} members to group {gid}")
        elif op == "leave" and groups:
            gid = rng.choice(groups)
            members = graph._members(tenant, gid)
            if not members:
                continue
            gone = rng.sample(members, min(len(members), rng.randint(1, 2)))
            graph.remove_members(tenant, gid, gone)
            done.append(f"remove {len(gone)} members from group {gid}")
        elif op == "rename" and groups:
            gid = rng.choice(groups)
            graph.update(tenant, "groups", gid, displayName=f"Group {rng.randrange(10**6)}")
            done.append(f"rename group {gid}")
    return done


# -- pytest fixture -------------------------------------------------------------------------


@pytest.fixture
def fake_graph(ca: trustme.CA, fake_entra: FakeEntra) -> Iterator[FakeGraph]:
    """A started fake Graph accepting the tokens ``fake_entra`` issues; stopped at teardown."""
    with FakeGraph(ca, fake_entra) as graph, contextlib.closing(graph.subscriptions):
        yield graph
