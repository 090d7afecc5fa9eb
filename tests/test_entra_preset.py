"""``[[jobs]] preset = "entra"``: the whole Entra table set from one entry, through real `graphsync sync` runs.

The fake Graph (with :mod:`tests.fakes.entra_set`) holds two tenants with a little of every collection; the second
has no premium licence. After a run, every table of the set exists and holds each tenant's objects, typed; the
unlicensed tenant's licensed jobs fail naming the licence, and all its other jobs succeed. Log tables take each
record once, however often a run reads it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from graphsync.config import Settings
from graphsync.config.presets import ENTRA
from tests.fakes.entra_set import EntraSetGraph, entra_graph, seed_entra
from tests.test_sync import output_text

if TYPE_CHECKING:
    from tests.conftest import RunGraphsync, WriteConfig

__all__ = ["entra_graph"]  # the fixture, imported for pytest

TENANTS = ("contoso.onmicrosoft.com", "fabrikam.onmicrosoft.com")
LICENSED, UNLICENSED = TENANTS
LICENSED_JOBS = {
    "sign-ins": "Microsoft Entra ID P1 or P2",
    "user-registration-details": "Microsoft Entra ID P1 or P2",
    "role-eligibility-schedule-instances": "Microsoft Entra ID P2 or Microsoft Entra ID Governance",
    "role-assignment-schedule-instances": "Microsoft Entra ID P2 or Microsoft Entra ID Governance",
}
# table -> the fake's collection it holds
ENTITY_TABLES = {
    "users": "users",
    "groups": "groups",
    "applications": "applications",
    "service_principals": "servicePrincipals",
    "directory_roles": "directoryRoles",
    "devices": "devices",
    "oauth2_permission_grants": "oauth2PermissionGrants",
    "directory_role_templates": "directoryRoleTemplates",
    "identity_providers": "identity/identityProviders",
    "role_eligibility_schedule_instances": "roleManagement/directory/roleEligibilityScheduleInstances",
    "role_assignment_schedule_instances": "roleManagement/directory/roleAssignmentScheduleInstances",
    "user_registration_details": "reports/authenticationMethods/userRegistrationDetails",
}
LICENSED_TABLES = {"sign_ins", "user_registration_details", "role_eligibility_schedule_instances"} | {
    "role_assignment_schedule_instances"
}
EDGE_TABLES = ("group_members", "group_owners", "directory_role_members")
LOG_TABLES = {"sign_ins": "auditLogs/signIns", "directory_audits": "auditLogs/directoryAudits"}


def rows(root: Path, table: str) -> list[dict[str, Any]]:
    return list(DeltaTable(str(root / table)).to_pyarrow_table().to_pylist())


def keys(root: Path, table: str, *columns: str) -> set[tuple[Any, ...]]:
    return {tuple(row[c] for c in ("tenant_id", *columns)) for row in rows(root, table)}


def types(root: Path, table: str) -> dict[str, str]:
    return {field.name: str(field.type) for field in pa.schema(DeltaTable(str(root / table)).schema().to_arrow())}


def expected_edges(graph: EntraSetGraph, table: str) -> set[tuple[str, str, str]]:
    edges: set[tuple[str, str, str]] = set()
    for tenant in TENANTS:
        if table == "group_owners":
            edges |= {(tenant, g, o) for g, owners in graph.owners(tenant).items() for o in owners}
        else:
            resource = "groups" if table == "group_members" else "directoryRoles"
            objects = graph.objects(tenant, resource)
            edges |= {(tenant, oid, m) for oid, obj in objects.items() for m in obj["members"]}
    return edges


def test_the_entra_preset_is_one_entry_for_the_whole_table_set() -> None:
    settings = Settings(
        identity={"client_id": "c", "tenants": list(TENANTS), "client_secret": "s"},
        storage={"account_url": "https://acct.blob.core.windows.net"},
        output={"directory": "/tmp/out", "tables": True},
        jobs=[{"preset": "entra", "every": "1h", "tenants": [LICENSED]}],
    )
    assert [job.name for job in settings.jobs] == [job["name"] for job in ENTRA]
    assert {job.every for job in settings.jobs} == {"1h"}
    assert {tuple(settings.job_tenants(job)) for job in settings.jobs} == {(LICENSED,)}
    kinds = {job.name: "delta" if job.delta else "cursor" if job.cursor else "listing" for job in settings.jobs}
    assert [name for name, kind in kinds.items() if kind == "cursor"] == ["sign-ins", "directory-audits"]
    assert kinds["admin-consent-request-policy"] == "listing"
    with pytest.raises(ValueError, match=r"jobs\[0\]\.preset: expected one of entra"):
        Settings(**{**settings.model_dump(mode="json"), "jobs": [{"preset": "lakeflow", "every": "1h"}]})
    with pytest.raises(ValueError, match=r"jobs\[0\]\.select: is set by the preset"):
        Settings(**{**settings.model_dump(mode="json"), "jobs": [{"preset": "entra", "every": "1h", "select": []}]})


def test_the_entra_preset_lands_every_table_for_two_tenants_and_names_the_missing_licence(
    graphsync_config: WriteConfig, entra_graph: EntraSetGraph, run_graphsync: RunGraphsync, tmp_path: Path
) -> None:
    for number, tenant in enumerate(TENANTS):
        seed_entra(entra_graph, tenant, seed=10 + number)
    entra_graph.unlicense(UNLICENSED)
    out = tmp_path / "out"
    config = graphsync_config(
        tenants=TENANTS,
        extra={
            "graph": {"endpoint": entra_graph.base_url},
            "output": {"directory": str(out), "tables": True},
            "jobs": [{"preset": "entra", "every": "1h"}],
        },
    )
    result = run_graphsync("sync", "--config", str(config), timeout=180)
    assert result.returncode == 1, output_text(result)  # the unlicensed tenant's licensed jobs failed
    assert "Traceback" not in result.stderr, output_text(result)

    for job in ENTRA:
        for tenant in TENANTS:
            state = json.loads((out / tenant / job["name"] / "state.json").read_text())
            if tenant == UNLICENSED and job["name"] in LICENSED_JOBS:
                assert LICENSED_JOBS[job["name"]] in state["last_error"], state["last_error"]
                assert f"tenant {tenant} lacks" in state["last_error"]
                assert "last_success" not in state
            else:
                assert state["last_error"] is None and state["last_success"], (tenant, job["name"], state)

    root = out / "tables"
    for table, resource in ENTITY_TABLES.items():
        holders = (LICENSED,) if table in LICENSED_TABLES else TENANTS
        want = {(tenant, oid) for tenant in holders for oid in entra_graph.objects(tenant, resource)}
        assert want and keys(root, table, "id") == want, table
    for table in EDGE_TABLES:
        columns = [name for name in types(root, table) if name.endswith("_id") and name != "tenant_id"]
        assert keys(root, table, *columns) == expected_edges(entra_graph, table), table
    managers = {(t, u, m) for t in TENANTS for u, m in entra_graph.managers(t).items()}
    assert {(r["tenant_id"], r["id"], r["manager_id"]) for r in rows(root, "users") if r["manager_id"]} == managers

    policy = sorted(rows(root, "admin_consent_request_policy"), key=lambda row: row["tenant_id"])
    assert [(r["tenant_id"], r["id"], r["isEnabled"], r["requestDurationInDays"]) for r in policy] == [
        (tenant, "adminConsentRequestPolicy", True, 30) for tenant in TENANTS
    ]
    assert json.loads(policy[0]["reviewers"])[0]["query"].startswith("/users/")

    for table, resource in LOG_TABLES.items():
        holders = (LICENSED,) if table in LICENSED_TABLES else TENANTS
        want = {(tenant, rid) for tenant in holders for rid in entra_graph.log_records(tenant, resource)}
        assert keys(root, table, "id") == want, table

    # documented primitive properties are typed, complex ones JSON text, times tz-aware UTC
    assert types(root, "service_principals")["accountEnabled"] == "bool"
    assert types(root, "service_principals")["servicePrincipalNames"] == "string"
    assert types(root, "devices")["registrationDateTime"] == "timestamp[us, tz=UTC]"
    assert types(root, "admin_consent_request_policy")["requestDurationInDays"] == "int64"
    assert types(root, "user_registration_details")["isMfaRegistered"] == "bool"
    assert types(root, "role_eligibility_schedule_instances")["startDateTime"] == "timestamp[us, tz=UTC]"
    assert types(root, "sign_ins")["createdDateTime"] == "timestamp[us, tz=UTC]"
    assert types(root, "sign_ins")["isInteractive"] == "bool"
    assert types(root, "directory_audits")["targetResources"] == "string"

    # the log tables take each record once: a run that reads the same window again adds nothing; new records land
    versions = {table: DeltaTable(str(root / table)).version() for table in LOG_TABLES}
    now = datetime.now(UTC)
    entra_graph.add_log_records(
        LICENSED,
        "auditLogs/signIns",
        [{"id": "late-sign-in", "createdDateTime": (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")}],
    )
    result = run_graphsync("sync", "--config", str(config), "--job", "sign-ins", "--job", "directory-audits")
    assert result.returncode == 1, output_text(result)  # the unlicensed tenant's sign-ins still fail
    assert DeltaTable(str(root / "directory_audits")).version() == versions["directory_audits"], "nothing new"
    sign_ins = [row["id"] for row in rows(root, "sign_ins")]
    assert sorted(sign_ins) == sorted([*entra_graph.log_records(LICENSED, "auditLogs/signIns")]), "each once"
    assert DeltaTable(str(root / "sign_ins")).version() == versions["sign_ins"] + 1
