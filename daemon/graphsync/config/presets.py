"""Presets: one ``[[jobs]]`` entry that stands for a documented set of jobs (``preset = "entra"``).

Why a job entry rather than a top-level switch: the entry takes the keys every job takes for *when* and *for whom*
(``every`` or ``cron``, ``tenants``), so a preset can run hourly for some tenants and daily for others, sit next to
hand-written jobs, and be read back by ``status`` and ``check`` as the ordinary jobs it expands to. Nothing below the
configuration knows presets exist.

``entra`` is the table set of Databricks' Lakeflow Connect Entra ID connector, read the way Graph serves each
collection best: by delta where Graph has it, as a full listing where it does not, singletons as one-row tables, and
the sign-in and audit logs by time cursor (append-only tables). Each ``select`` names Graph v1.0's documented
properties; ``graphsync.tables.layout`` types the primitive ones.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from graphsync.config.errors import Loc

# Keys a preset entry takes: which preset, and when and for whom its jobs run. Everything else is the preset's.
PRESET_KEYS = frozenset({"preset", "every", "cron", "tenants"})

_USER = (
    "displayName givenName surname mail userPrincipalName jobTitle department companyName officeLocation "
    "employeeId userType accountEnabled createdDateTime onPremisesSyncEnabled onPremisesImmutableId usageLocation "
    "externalUserState"
)
_GROUP = (
    "displayName description mail mailEnabled mailNickname securityEnabled groupTypes visibility createdDateTime "
    "isAssignableToRole membershipRule onPremisesSyncEnabled members owners"
)
_APPLICATION = "appId displayName description signInAudience publisherDomain createdDateTime identifierUris tags"
_SERVICE_PRINCIPAL = (
    "appId displayName accountEnabled servicePrincipalType appOwnerOrganizationId appRoleAssignmentRequired "
    "signInAudience preferredSingleSignOnMode servicePrincipalNames tags"
)
_DEVICE = (
    "deviceId displayName accountEnabled operatingSystem operatingSystemVersion trustType isCompliant isManaged "
    "approximateLastSignInDateTime registrationDateTime manufacturer model"
)
_GRANT = "clientId consentType principalId resourceId scope"
_SCHEDULE_INSTANCE = "principalId roleDefinitionId directoryScopeId appScopeId startDateTime endDateTime memberType"
_REGISTRATION = (
    "userPrincipalName userDisplayName userType isAdmin isMfaCapable isMfaRegistered isPasswordlessCapable "
    "isSsprCapable isSsprEnabled isSsprRegistered isSystemPreferredAuthenticationMethodEnabled lastUpdatedDateTime "
    "defaultMfaMethod methodsRegistered userPreferredMethodForSecondaryAuthentication"
)
_SIGN_IN = (
    "createdDateTime userId userDisplayName userPrincipalName appId appDisplayName ipAddress clientAppUsed "
    "conditionalAccessStatus isInteractive correlationId resourceDisplayName riskLevelDuringSignIn riskState status "
    "location deviceDetail"
)
_AUDIT = (
    "activityDateTime activityDisplayName category correlationId loggedByService operationType result resultReason "
    "initiatedBy targetResources"
)


def _job(name: str, resource: str, select: str, **keys: Any) -> dict[str, Any]:
    return {"name": name, "resource": resource, "select": select.split(), **keys}


ENTRA: tuple[dict[str, Any], ...] = (
    # by delta
    _job("users", "users", _USER, delta=True, expand=["manager"]),
    _job("groups", "groups", _GROUP, delta=True),
    _job("applications", "applications", _APPLICATION, delta=True),
    _job("service-principals", "servicePrincipals", _SERVICE_PRINCIPAL, delta=True),
    _job("directory-roles", "directoryRoles", "description displayName roleTemplateId members", delta=True),
    _job("devices", "devices", _DEVICE, delta=True),
    _job("oauth2-permission-grants", "oauth2PermissionGrants", _GRANT, delta=True),
    # full listings: Graph has no delta for these
    _job("directory-role-templates", "directoryRoleTemplates", "description displayName"),
    _job("identity-providers", "identity/identityProviders", "displayName"),
    _job(
        "role-eligibility-schedule-instances",
        "roleManagement/directory/roleEligibilityScheduleInstances",
        _SCHEDULE_INSTANCE + " roleEligibilityScheduleId",
    ),
    _job(
        "role-assignment-schedule-instances",
        "roleManagement/directory/roleAssignmentScheduleInstances",
        _SCHEDULE_INSTANCE + " assignmentType roleAssignmentScheduleId roleAssignmentOriginId",
    ),
    _job("user-registration-details", "reports/authenticationMethods/userRegistrationDetails", _REGISTRATION),
    # a singleton: a one-row table
    _job(
        "admin-consent-request-policy",
        "policies/adminConsentRequestPolicy",
        "isEnabled notifyReviewers remindersEnabled requestDurationInDays version reviewers",
    ),
    # logs by time cursor: append-only tables
    _job("sign-ins", "auditLogs/signIns", _SIGN_IN, cursor="createdDateTime"),
    _job("directory-audits", "auditLogs/directoryAudits", _AUDIT, cursor="activityDateTime"),
)
PRESETS: Mapping[str, tuple[dict[str, Any], ...]] = {"entra": ENTRA}


def expand_presets(jobs: Sequence[Any]) -> tuple[list[Any], list[tuple[Loc, str]]]:
    """``jobs`` with every preset entry replaced by its jobs (carrying the entry's schedule and tenants), and the
    problems of the preset entries, located at the entry."""
    expanded: list[Any] = []
    problems: list[tuple[Loc, str]] = []
    for index, entry in enumerate(jobs):
        if not isinstance(entry, Mapping) or "preset" not in entry:
            expanded.append(entry)
            continue
        preset = PRESETS.get(entry["preset"]) if isinstance(entry["preset"], str) else None
        if preset is None:
            problems.append((("jobs", index, "preset"), f"expected one of {', '.join(sorted(PRESETS))}"))
            continue
        extra = sorted(set(entry) - PRESET_KEYS)
        for key in extra:
            problems.append(
                (("jobs", index, key), "is set by the preset; a preset entry takes only every, cron and tenants")
            )
        shared = {key: entry[key] for key in ("every", "cron", "tenants") if key in entry}
        expanded += [{**job, **shared} for job in preset]
    return expanded, problems
