"""Which tables a job feeds, their columns and the columns' types.

One table per collection, holding every tenant (``tenant_id``), named after the resource in snake case
(``users``, ``groups``, ``directory_roles``, ``service_principals``); one per relationship a delta job tracks, the
shape warehouses join on: ``group_members``, ``group_owners``, ``directory_role_members``. A user's manager is a
column, ``manager_id``. ``<table>_history`` (SCD type 2) for users, groups and the relationships. A log read by time
(sign-ins, directory audits) feeds one append-only table, keyed by ``id``.

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


# Graph v1.0's documented primitive properties of the collections of the Entra preset (graphsync.config.presets),
# by resource path. Anything not listed is JSON text.
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
    "applications": _of(
        "string",
        "appId defaultRedirectUri description disabledByMicrosoftStatus displayName groupMembershipClaims notes "
        "publisherDomain samlMetadataUrl serviceManagementReference signInAudience tokenEncryptionKeyId uniqueName",
    )
    | _of("boolean", "isDeviceOnlyAuthSupported isFallbackPublicClient")
    | _of("timestamp", "createdDateTime deletedDateTime"),
    "servicePrincipals": _of(
        "string",
        "appDescription appDisplayName appId appOwnerOrganizationId description disabledByMicrosoftStatus "
        "displayName homepage loginUrl logoutUrl notes preferredSingleSignOnMode preferredTokenSigningKeyThumbprint "
        "samlMetadataUrl servicePrincipalType signInAudience tokenEncryptionKeyId",
    )
    | _of("boolean", "accountEnabled appRoleAssignmentRequired")
    | _of("timestamp", "deletedDateTime"),
    "devices": _of(
        "string",
        "deviceId deviceOwnership displayName enrollmentProfileName enrollmentType managementType manufacturer "
        "mdmAppId model onPremisesSecurityIdentifier operatingSystem operatingSystemVersion profileType trustType",
    )
    | _of("boolean", "accountEnabled isCompliant isManaged isRooted onPremisesSyncEnabled")
    | _of("integer", "deviceVersion")
    | _of(
        "timestamp",
        "approximateLastSignInDateTime complianceExpirationDateTime deletedDateTime onPremisesLastSyncDateTime "
        "registrationDateTime",
    ),
    "oauth2PermissionGrants": _of("string", "clientId consentType principalId resourceId scope"),
    "directoryRoleTemplates": _of("string", "description displayName") | _of("timestamp", "deletedDateTime"),
    "identity/identityProviders": _of("string", "displayName"),
    "roleManagement/directory/roleEligibilityScheduleInstances": _of(
        "string", "appScopeId directoryScopeId memberType principalId roleDefinitionId roleEligibilityScheduleId"
    )
    | _of("timestamp", "endDateTime startDateTime"),
    "roleManagement/directory/roleAssignmentScheduleInstances": _of(
        "string",
        "appScopeId assignmentType directoryScopeId memberType principalId roleAssignmentOriginId "
        "roleAssignmentScheduleId roleDefinitionId",
    )
    | _of("timestamp", "endDateTime startDateTime"),
    "reports/authenticationMethods/userRegistrationDetails": _of(
        "string",
        "defaultMfaMethod userDisplayName userPreferredMethodForSecondaryAuthentication userPrincipalName userType",
    )
    | _of(
        "boolean",
        "isAdmin isMfaCapable isMfaRegistered isPasswordlessCapable isSsprCapable isSsprEnabled isSsprRegistered "
        "isSystemPreferredAuthenticationMethodEnabled",
    )
    | _of("timestamp", "lastUpdatedDateTime"),
    "policies/adminConsentRequestPolicy": _of("boolean", "isEnabled notifyReviewers remindersEnabled")
    | _of("integer", "requestDurationInDays version"),
    "auditLogs/signIns": _of(
        "string",
        "appDisplayName appId clientAppUsed conditionalAccessStatus correlationId ipAddress resourceDisplayName "
        "resourceId riskDetail riskLevelAggregated riskLevelDuringSignIn riskState userDisplayName userId "
        "userPrincipalName",
    )
    | _of("boolean", "isInteractive")
    | _of("timestamp", "createdDateTime"),
    "auditLogs/directoryAudits": _of(
        "string",
        "activityDisplayName category correlationId loggedByService operationType result resultReason",
    )
    | _of("timestamp", "activityDateTime"),
}

# Tables named after the collection rather than its whole path (the rule of table_name).
TABLE_NAMES = {
    "identity/identityProviders": "identity_providers",
    "roleManagement/directory/roleEligibilityScheduleInstances": "role_eligibility_schedule_instances",
    "roleManagement/directory/roleAssignmentScheduleInstances": "role_assignment_schedule_instances",
    "reports/authenticationMethods/userRegistrationDetails": "user_registration_details",
    "policies/adminConsentRequestPolicy": "admin_consent_request_policy",
    "auditLogs/signIns": "sign_ins",
    "auditLogs/directoryAudits": "directory_audits",
    "auditLogs/provisioning": "provisioning",
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
    ``log_time``: for a log's append-only table, its time column (a record re-delivered has the time it had).
    """

    name: str
    keys: tuple[str, ...]
    columns: tuple[Column, ...]
    history: bool
    link: str | None = None
    log_time: str | None = None

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
    """``servicePrincipals`` -> ``service_principals``; ``groups/ID/members`` -> ``groups_id_members``; the
    collections of :data:`TABLE_NAMES` by their own name (``auditLogs/signIns`` -> ``sign_ins``)."""
    if resource in TABLE_NAMES:
        return TABLE_NAMES[resource]
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", resource).replace("/", "_").replace("-", "_").replace(".", "_")
    return snake.lower()


def job_tables(job: JobSettings) -> JobTables:
    """The tables ``job`` feeds: a log read by time feeds one append-only table."""
    kinds = PROPERTY_KINDS.get(job.resource, {})
    if job.cursor is not None:
        names = dict.fromkeys([*(job.select or ()), job.cursor])
        logged = tuple(
            Column(name, "timestamp" if name == job.cursor else kinds.get(name, "json")) for name in names if name != ID
        )
        return JobTables(TableSpec(table_name(job.resource), (ID,), logged, False, log_time=job.cursor), ())
    tracked = {name for name in (*(job.select or ()), *(job.expand or ())) if (job.resource, name) in EDGE_TABLES}
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
