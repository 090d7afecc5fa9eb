"""Which tables a job feeds, their columns and the columns' types.

One table per collection, holding every tenant (``tenant_id``), named after the resource in snake case
(``users``, ``groups``, ``directory_roles``, ``service_principals``); one per relationship a delta job tracks, the
shape warehouses join on: ``group_members``, ``group_owners``, ``directory_role_members``. A user's manager is a
column, ``manager_id``. ``<table>_history`` (SCD type 2) for users, groups and the relationships.

Columns are the job's ``select`` (``id`` is the key; relationship names become their own tables). Graph's
documented primitive properties get their type: string, boolean, integer, timestamp (UTC, tz-aware: a naive one
would become ``timestamp_ntz``, which needs reader 3 / writer 7 and which Fabric's SQL endpoint cannot read).
Everything else — arrays, complex types, properties this module does not know — is a string holding the value as
JSON. Why JSON rather than Delta structs: Graph's complex types vary with ``$select``, API version and tenant
features; a struct would need a schema change (a Metadata action, which conflicts with every concurrent writer)
whenever a nested field appears, while a JSON string never does, and every reader (Spark's ``from_json``, Fabric's
``JSON_VALUE``, Polars, DuckDB) parses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from graphsync.config import JobSettings

Kind = Literal["string", "boolean", "integer", "timestamp", "json"]

TENANT_ID = "tenant_id"
ID = "id"
MANAGER_ID = "manager_id"
MANAGER = "manager"
VALID_FROM = "valid_from"
VALID_TO = "valid_to"
IS_CURRENT = "is_current"
HISTORY_SUFFIX = "_history"


def _of(kind: Kind, names: str) -> dict[str, Kind]:
    return dict.fromkeys(names.split(), kind)


# Graph v1.0's documented primitive properties of the resources with history (user, group, directoryRole).
# Anything not listed is JSON text.
PROPERTY_KINDS: dict[str, dict[str, Kind]] = {
    "users": _of(
        "string",
        "aboutMe ageGroup city companyName consentProvidedForMinor country department displayName employeeId "
        "employeeType externalUserState faxNumber givenName jobTitle legalAgeGroupClassification mail "
        "mailNickname mobilePhone mySite officeLocation onPremisesDistinguishedName onPremisesDomainName "
        "onPremisesImmutableId onPremisesSamAccountName onPremisesSecurityIdentifier onPremisesUserPrincipalName "
        "passwordPolicies postalCode preferredDataLocation preferredLanguage preferredName securityIdentifier "
        "state streetAddress surname usageLocation userPrincipalName userType",
    )
    | _of("boolean", "accountEnabled isResourceAccount onPremisesSyncEnabled")
    | _of(
        "timestamp",
        "birthday createdDateTime deletedDateTime employeeHireDate employeeLeaveDateTime "
        "externalUserStateChangeDateTime hireDate lastPasswordChangeDateTime onPremisesLastSyncDateTime "
        "refreshTokensValidFromDateTime signInSessionsValidFromDateTime",
    ),
    "groups": _of(
        "string",
        "classification description displayName mail mailNickname membershipRule membershipRuleProcessingState "
        "onPremisesDomainName onPremisesNetBiosName onPremisesSamAccountName onPremisesSecurityIdentifier "
        "preferredDataLocation preferredLanguage securityIdentifier theme uniqueName visibility",
    )
    | _of(
        "boolean",
        "hideFromAddressLists hideFromOutlookClients isAssignableToRole isManagementRestricted mailEnabled "
        "onPremisesSyncEnabled securityEnabled",
    )
    | _of(
        "timestamp",
        "createdDateTime deletedDateTime expirationDateTime onPremisesLastSyncDateTime renewedDateTime",
    ),
    "directoryRoles": _of("string", "description displayName roleTemplateId"),
}

# Relationships a delta job tracks as <link>@delta, and the table each becomes: (resource, link) ->
# (table, source column, target column, type column).
EDGE_TABLES: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("groups", "members"): ("group_members", "group_id", "member_id", "member_type"),
    ("groups", "owners"): ("group_owners", "group_id", "owner_id", "owner_type"),
    ("directoryRoles", "members"): ("directory_role_members", "role_id", "member_id", "member_type"),
}
HISTORY_RESOURCES = frozenset({"users", "groups"})


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind


@dataclass(frozen=True)
class TableSpec:
    """One table: its key columns after ``tenant_id``, its value columns, and whether it keeps a history.

    ``link``: for a relationship table, the record property it comes from (``members`` for ``members@delta``).
    """

    name: str
    keys: tuple[str, ...]
    columns: tuple[Column, ...]
    history: bool
    link: str | None = None

    @property
    def history_name(self) -> str:
        return self.name + HISTORY_SUFFIX


@dataclass(frozen=True)
class JobTables:
    """The tables one job feeds: its collection's, and one per relationship it tracks."""

    entity: TableSpec
    edges: tuple[TableSpec, ...]

    @property
    def all(self) -> tuple[TableSpec, ...]:
        return (self.entity, *self.edges)


def table_name(resource: str) -> str:
    """``servicePrincipals`` -> ``service_principals``; ``groups/ID/members`` -> ``groups_id_members``."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", resource).replace("/", "_").replace("-", "_").replace(".", "_")
    return snake.lower()


def job_tables(job: JobSettings) -> JobTables | None:
    """The tables ``job`` feeds; ``None`` for a log read by time (no table of its own yet)."""
    if job.cursor is not None:
        return None
    tracked = {name for name in (*(job.select or ()), *(job.expand or ())) if (job.resource, name) in EDGE_TABLES}
    kinds = PROPERTY_KINDS.get(job.resource, {})
    columns = [
        Column(name, kinds.get(name, "json"))
        for name in dict.fromkeys(job.select or ())
        if name not in (ID, MANAGER) and name not in tracked
    ]
    if MANAGER in (job.expand or ()):  # the working store keeps it as "manager": the manager's id or null
        columns.append(Column(MANAGER_ID, "string"))
    history = job.resource in HISTORY_RESOURCES
    entity = TableSpec(table_name(job.resource), (ID,), tuple(columns), history)
    edges = []
    for link in sorted(tracked):
        name, source, target, kind = EDGE_TABLES[(job.resource, link)]
        edges.append(TableSpec(name, (source, target), (Column(kind, "string"),), history=True, link=link))
    return JobTables(entity, tuple(edges))
