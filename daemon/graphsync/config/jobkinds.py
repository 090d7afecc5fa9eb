"""What Microsoft Graph allows each kind of job, so that a job Graph would refuse (or silently mis-serve) fails at load.

Three kinds of job read a collection: a full listing, a delta query (``delta = true``), and a time-cursor read of an
append-only log (``cursor = "..."``), which has no delta and is filtered by its timestamp instead. The facts here are
from Graph's documentation: delta on users and groups reports relationships as ``<name>@delta`` annotations, and
only ``manager`` (users) and ``members`` (groups) can be tracked that way; the sign-in, directory audit and
provisioning logs have no delta and filter by ``createdDateTime`` / ``activityDateTime``, each with the operators
its page documents: ``ge``/``le`` on sign-ins and directory audits, only ``gt``/``lt`` on provisioning; all three
document ``$orderby`` on that property.
"""

from collections.abc import Mapping

# Relationships a delta query on the resource can track, as `expand` entries.
DELTA_LINKS: Mapping[str, frozenset[str]] = {
    "users": frozenset({"manager"}),
    "groups": frozenset({"members"}),
}

# The logs Graph serves only by time, and the property each one filters and orders on.
LOG_CURSORS: Mapping[str, str] = {
    "auditLogs/signIns": "createdDateTime",
    "auditLogs/directoryAudits": "activityDateTime",
    "auditLogs/provisioning": "activityDateTime",
}
# Single objects, not collections: a GET answers the object itself (no `value`, no paging). A listing job reads it
# as a collection of one, keyed by the resource's last segment (the object may carry no `id`).
SINGLETONS: frozenset[str] = frozenset({"policies/adminConsentRequestPolicy"})

# Collections Graph serves only to tenants with a licence, and which. Without it Graph answers 403 with a code such as
# Authentication_RequestFromNonPremiumTenantOrB2CTenant ("Neither tenant is B2C or tenant doesn't have premium
# license") or AadPremiumLicenseRequired; the run then fails naming the licence.
_P1 = "Microsoft Entra ID P1 or P2"
_P2 = "Microsoft Entra ID P2 or Microsoft Entra ID Governance"
LICENCES: Mapping[str, str] = {
    "auditLogs/signIns": _P1,
    "reports/authenticationMethods/userRegistrationDetails": _P1,
    "roleManagement/directory/roleEligibilityScheduleInstances": _P2,
    "roleManagement/directory/roleAssignmentScheduleInstances": _P2,
}

# Logs whose time property Graph filters only with the strict operators gt and lt (no ge, no le).
STRICT_TIME_FILTERS: frozenset[str] = frozenset({"auditLogs/provisioning"})


def expand_problem(resource: str, expand: list[str]) -> str | None:
    """Why ``expand`` does not suit a delta query on ``resource``, or ``None``."""
    allowed = DELTA_LINKS.get(resource)
    if allowed is None:
        known = ", ".join(f"{name} ({', '.join(sorted(links))})" for name, links in DELTA_LINKS.items())
        return f"Graph's delta tracks links only on {known}; {resource} has none"
    unknown = sorted(set(expand) - allowed)
    if unknown:
        return f"delta on {resource} can expand only {', '.join(sorted(allowed))}, not {', '.join(unknown)}"
    return None


def cursor_problem(resource: str, cursor: str) -> str | None:
    """Why ``cursor`` is not the time property ``resource`` filters on, or ``None`` (any property elsewhere)."""
    expected = LOG_CURSORS.get(resource)
    if expected is not None and cursor != expected:
        return f'{resource} is filtered by time on {expected}: set cursor = "{expected}"'
    return None
