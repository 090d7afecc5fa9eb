"""The fake Graph, serving the whole Entra table set (``preset = "entra"``): what :class:`FakeGraph` lacks for it.

:class:`FakeGraph` serves collections one or two path segments deep. This adds, on the same server:

* full listings deeper down: ``identity/identityProviders``,
  ``roleManagement/directory/roleEligibilityScheduleInstances`` (and ``roleAssignmentScheduleInstances``),
  ``reports/authenticationMethods/userRegistrationDetails``: paged as any listing (:meth:`FakeGraph.add` fills
  them, under their whole path);
* singletons: ``policies/adminConsentRequestPolicy`` answers the object itself (``$select`` honoured), as Graph does;
* licences: :meth:`EntraSetGraph.unlicense` makes a tenant answer the licensed collections as Graph answers a tenant
  without Entra ID P1/P2 (sign-ins, registration details: 403 ``Authentication_RequestFromNonPremiumTenantOrB2CTenant``)
  or without P2/Governance (PIM schedule instances: 403 ``AadPremiumLicenseRequired``).

:func:`seed_entra` fills a tenant with a little of everything the preset reads.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import pytest
import trustme

from tests.fakes.entra import FakeEntra, tenant_id
from tests.fakes.graph import FakeGraph, _GraphError, _json, _render, _Reply, populate

DEEP_LISTINGS = frozenset(
    {
        "identity/identityProviders",
        "roleManagement/directory/roleEligibilityScheduleInstances",
        "roleManagement/directory/roleAssignmentScheduleInstances",
        "reports/authenticationMethods/userRegistrationDetails",
    }
)
SINGLETONS = frozenset({"policies/adminConsentRequestPolicy"})
NON_PREMIUM = (
    "Authentication_RequestFromNonPremiumTenantOrB2CTenant",
    "Neither tenant is B2C or tenant doesn't have premium license",
)
NO_P2 = ("AadPremiumLicenseRequired", "The tenant needs an AAD Premium 2 license.")
LICENSED = {
    "auditLogs/signIns": NON_PREMIUM,
    "reports/authenticationMethods/userRegistrationDetails": NON_PREMIUM,
    "roleManagement/directory/roleEligibilityScheduleInstances": NO_P2,
    "roleManagement/directory/roleAssignmentScheduleInstances": NO_P2,
}


class EntraSetGraph(FakeGraph):
    """:class:`FakeGraph` plus deep listings, singletons and tenants without premium licences."""

    def __init__(self, ca: trustme.CA, entra: FakeEntra, **kwargs: Any) -> None:
        super().__init__(ca, entra, **kwargs)
        self._unlicensed: set[str] = set()
        self._singletons: dict[tuple[str, str], dict[str, Any]] = {}

    def unlicense(self, tenant: str) -> None:
        """``tenant`` has neither Entra ID P1/P2 nor Governance: its licensed collections answer 403."""
        with self._lock:
            self._unlicensed.add(tenant_id(tenant))

    def set_singleton(self, tenant: str, resource: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._singletons[(tenant_id(tenant), resource)] = dict(obj)

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
        resource = "/".join(unquote(part) for part in path.split("/")[2:] if part)
        known = resource in DEEP_LISTINGS or resource in SINGLETONS or resource in LICENSED
        if not known or not token or tenant is None or not self._entra.is_valid(token) or method != "GET":
            return super()._serve(method, path, query, headers, token, tenant, body)  # its own answers and errors
        key = tenant_id(tenant)
        with self._lock:
            unlicensed = key in self._unlicensed
            singleton = self._singletons.get((key, resource))
        if unlicensed and resource in LICENSED:
            raise _GraphError(403, *LICENSED[resource])
        if resource in SINGLETONS:
            if singleton is None:
                raise _GraphError(404, "Request_ResourceNotFound", f"Resource '{resource}' does not exist.")
            select = tuple(name for name in (query.get("$select") or "").split(",") if name) or None
            body = {"@odata.context": f"{self.base_url}/v1.0/$metadata#{resource}/$entity"}
            rendered = _render({**singleton, "id": ""}, select, None)
            return _Reply(200, _json(body | {k: v for k, v in rendered.items() if k != "id"}))  # Graph sends no id
        if resource in DEEP_LISTINGS:
            return self._page(key, resource, False, query, False)
        return super()._serve(method, path, query, headers, token, tenant)


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def seed_entra(graph: EntraSetGraph, tenant: str, seed: int) -> None:
    """A little of everything ``preset = "entra"`` reads, reproducibly; log records within the last day."""
    rng = random.Random(seed)
    populate(graph, tenant, users=30, groups=6, seed=seed)
    users = sorted(graph.objects(tenant, "users"))
    for index in range(1, 12):
        graph.set_manager(tenant, users[index], users[index // 4])
    for index, group in enumerate(sorted(graph.objects(tenant, "groups"))):
        graph.set_owners(tenant, group, users[index : index + 1 + index % 2])
        graph.update(tenant, "groups", group, groupTypes=["Unified"] if index % 2 else [], visibility="Private")
    for number, name in enumerate(("Global Administrator", "User Administrator")):
        template = f"{seed:02d}000000-0000-0000-0000-00000000000{number}"
        graph.add(tenant, "directoryRoleTemplates", {"id": template, "displayName": name, "description": name})
        role = {"id": f"role-{seed}-{number}", "displayName": name, "roleTemplateId": template}
        graph.add(tenant, "directoryRoles", {**role, "members": users[number : number + 2]})
        for kind in ("Eligibility", "Assignment"):
            instance = {
                "id": f"{kind.lower()}-{seed}-{number}",
                "principalId": users[5 + number],
                "roleDefinitionId": template,
                "directoryScopeId": "/",
                "memberType": "Direct",
                "startDateTime": "2024-03-01T08:00:00Z",
                "endDateTime": None,
            }
            graph.add(tenant, f"roleManagement/directory/role{kind}ScheduleInstances", instance)
    for number in range(3):
        app_id = f"{seed:02d}00000a-0000-0000-0000-00000000000{number}"
        graph.add(
            tenant,
            "applications",
            {"id": f"app-{seed}-{number}", "appId": app_id, "displayName": f"App {number}", "tags": ["t"]},
        )
        graph.add(
            tenant,
            "servicePrincipals",
            {
                "id": f"sp-{seed}-{number}",
                "appId": app_id,
                "displayName": f"App {number}",
                "accountEnabled": number != 1,
                "servicePrincipalNames": [app_id],
            },
        )
        graph.add(
            tenant,
            "oauth2PermissionGrants",
            {
                "id": f"grant-{seed}-{number}",
                "clientId": f"sp-{seed}-{number}",
                "consentType": "AllPrincipals",
                "resourceId": f"sp-{seed}-0",
                "scope": "User.Read",
            },
        )
        graph.add(
            tenant,
            "devices",
            {
                "id": f"device-{seed}-{number}",
                "deviceId": f"d{number}",
                "displayName": f"PC-{number}",
                "accountEnabled": True,
                "isCompliant": number % 2 == 0,
                "registrationDateTime": "2024-02-0" + str(number + 1) + "T10:00:00Z",
            },
        )
    graph.add(tenant, "identity/identityProviders", {"id": f"Google-OAUTH-{seed}", "displayName": "Google"})
    for user in users[:10]:
        graph.add(
            tenant,
            "reports/authenticationMethods/userRegistrationDetails",
            {
                "id": user,
                "userPrincipalName": f"{user}@example.com",
                "isAdmin": user == users[0],
                "isMfaRegistered": rng.random() < 0.5,
                "methodsRegistered": ["microsoftAuthenticatorPush"],
                "lastUpdatedDateTime": "2024-04-01T00:00:00Z",
            },
        )
    graph.set_singleton(
        tenant,
        "policies/adminConsentRequestPolicy",
        {
            "isEnabled": True,
            "notifyReviewers": False,
            "remindersEnabled": True,
            "requestDurationInDays": 30,
            "version": 2,
            "reviewers": [{"query": "/users/" + users[0]}],
        },
    )
    now = datetime.now(UTC)
    graph.add_log_records(
        tenant,
        "auditLogs/signIns",
        [
            {
                "id": f"signin-{seed}-{n}",
                "createdDateTime": _time(now - timedelta(minutes=30 + n)),
                "userId": users[n % len(users)],
                "isInteractive": n % 2 == 0,
                "status": {"errorCode": 0},
            }
            for n in range(12)
        ],
    )
    graph.add_log_records(
        tenant,
        "auditLogs/directoryAudits",
        [
            {
                "id": f"audit-{seed}-{n}",
                "activityDateTime": _time(now - timedelta(minutes=20 + n)),
                "activityDisplayName": "Update user",
                "result": "success",
                "targetResources": [{"id": users[n]}],
            }
            for n in range(5)
        ],
    )


@pytest.fixture
def entra_graph(ca: trustme.CA, fake_entra: FakeEntra) -> Iterator[EntraSetGraph]:
    with EntraSetGraph(ca, fake_entra) as graph:
        yield graph
