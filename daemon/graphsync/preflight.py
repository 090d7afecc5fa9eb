"""``graphsync check``: what an operator runs first on a new host — each check with the likely fix when it fails.

Order matters: configuration, then storage (the token cache and locks live there), then a token per tenant
(asked of the identity provider directly, so a wrong secret is not hidden by a token another replica cached),
then Graph for each job's resource. A failed tenant's Graph checks are skipped rather than reported twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import msal

from graphsync.config.jobkinds import LICENCES, SINGLETONS
from graphsync.graph import GraphClient, GraphError, LicenceRequired
from graphsync.identity import TRANSIENT_STATUSES, TokenError, build_application, failure_result, retrying_session
from graphsync.jobs import replica_name
from graphsync.storage import BlobStore, StorageError, WriteConflict
from graphsync.tables import probe_tables
from graphsync.tokencache import TokenCaches

if TYPE_CHECKING:
    from pathlib import Path

    from graphsync.config import Settings

AADSTS_FIXES = {
    "AADSTS7000215": "the client secret is wrong: use the secret's Value (not its Secret ID) from the app "
    "registration's Certificates & secrets",
    "AADSTS7000222": "the client secret has expired: create a new one in the app registration and update "
    "identity.client_secret(_file)",
    "AADSTS700016": "the application was not found in this tenant: check identity.client_id, and that the app is "
    "multi-tenant and admin-consented in every tenant listed in identity.tenants",
    "AADSTS90002": "the tenant was not found: check identity.tenants (a tenant id or a verified domain) and "
    "identity.authority_host (national clouds have their own)",
    "AADSTS700027": "the client assertion was rejected: upload this certificate to the app registration, or "
    "check that the private key matches it",
    "AADSTS70021": "no federated credential matches this workload: check the federated identity credential's "
    "issuer and subject (system:serviceaccount:NAMESPACE:NAME; for a managed identity, issuer "
    "https://login.microsoftonline.com/TENANT_ID/v2.0 and the identity's object id)",
    "AADSTS700024": "the federated token is expired or not yet valid: check the projected service account token "
    "and the host clock",
    "AADSTS7000218": "no credential was sent: configure exactly one of identity.client_secret, "
    "identity.certificate_file, identity.federated_token_file or "
    "identity.managed_identity_client_id",
    "AADSTS1002012": "client credentials need a '/.default' scope, e.g. https://graph.microsoft.com/.default",
    "AADSTS500011": "the resource in identity.scopes does not exist in this tenant: check identity.scopes",
}
GRAPH_PERMISSIONS = {
    "users": "User.Read.All",
    "groups": "Group.Read.All (or GroupMember.Read.All)",
    "serviceprincipals": "Application.Read.All",
    "applications": "Application.Read.All",
    "devices": "Device.Read.All",
    "contacts": "OrgContact.Read.All",
    "directoryroles": "RoleManagement.Read.Directory",
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SetupWarning:
    """A risk in a setup that works: reported with its fix, but never a failed check (the exit status stays)."""

    name: str
    detail: str
    fix: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def setup_warnings(settings: Settings) -> list[SetupWarning]:
    """What ``graphsync check`` warns about: read from the configuration alone, so it needs no storage or token.

    An unencrypted token cache; a delta job whose ``reconcile_every`` is not longer than its ``every`` (allowed, but
    then no run of it is a delta round)."""
    warnings = []
    if not settings.storage.encryption_keys:
        warnings.append(
            SetupWarning(
                "token cache encryption",
                f"the token cache blobs in container {settings.storage.container} are not encrypted "
                "(storage.encryption_key_file is not set): anyone who can read that container can use the app's "
                "access tokens until they expire",
                "generate a key with `openssl rand -base64 32 > cache-key`, give every replica the same file as "
                "storage.encryption_key_file, and restart them (README: Encrypting the token cache)",
            )
        )
    for index, job in enumerate(settings.jobs):
        reconcile, every = job.reconcile_seconds, job.interval_seconds
        if reconcile is not None and every is not None and reconcile <= every:
            warnings.append(
                SetupWarning(
                    f"jobs[{index}].reconcile_every",
                    f"job {job.name} runs every {job.every} but reconcile_every = {job.reconcile_every!r} is not "
                    "longer: every run is a full round compared with the snapshot, never a delta round",
                    'set reconcile_every longer than every (the default "6d" suits any job run at least weekly), '
                    'or "0" to turn reconciliation off',
                )
            )
    return warnings


def storage_fix(exc: StorageError) -> str:
    if exc.code == "AuthorizationPermissionMismatch":
        return (
            "assign the 'Storage Blob Data Contributor' role on the container (or account) to the identity "
            "graphsync runs as"
        )
    if exc.code == "AuthorizationFailure":
        return (
            "the request was refused: check the account key or SAS in storage.connection_string, and that the "
            "storage account's firewall allows this host"
        )
    if exc.code == "AuthenticationFailed":
        return "the account key or SAS in storage.connection_string is wrong or expired"
    if "ClientAuthenticationError" in str(exc) or "CredentialUnavailable" in str(exc):
        return (
            "no Azure credential for storage.account_url: use a managed identity or workload identity, or set "
            "storage.connection_string"
        )
    if exc.status is None:
        return (
            "storage did not answer: check storage.account_url / the connection string's endpoint, DNS and "
            "outbound HTTPS"
        )
    return "see the storage error above"


def token_fix(exc: TokenError) -> str:
    if exc.aadsts in AADSTS_FIXES:
        return AADSTS_FIXES[exc.aadsts]
    if exc.error == "managed_identity_unavailable":
        return (
            "no managed identity token: assign the identity to this resource and check "
            'identity.managed_identity_client_id (its client id, or "system"); the platform\'s endpoint '
            "(IDENTITY_ENDPOINT, or IMDS on a VM) must answer"
        )
    if exc.error == "credential_unreadable":
        return (
            "a credential file could not be read: check identity.certificate_file / federated_token_file "
            "(mounted, and readable by the service's user)"
        )
    if exc.error == "identity_provider_unavailable":
        return "the identity provider did not answer: check identity.authority_host, DNS and outbound HTTPS"
    return "see the error above; https://login.microsoftonline.com/error?code=<number> explains AADSTS codes"


def graph_fix(exc: GraphError, resource: str) -> str:
    if isinstance(exc, LicenceRequired):
        licence = LICENCES.get(resource, "a Microsoft Entra ID premium licence (P1 or P2)")
        return (
            f"{resource} needs {licence} in this tenant: license it, or leave the tenant out of the job (jobs.tenants)"
        )
    if exc.status == 403:
        permission = GRAPH_PERMISSIONS.get(resource.split("/")[0].lower(), "the matching *.Read.All permission")
        return f"grant the application permission {permission} (Microsoft Graph, Application) and admin consent"
    if exc.status == 404:
        return f"Graph has no collection '{resource}' in this API version: check jobs.resource and graph.api_version"
    if exc.status is None:
        return "Graph did not answer: check graph.endpoint, DNS and outbound HTTPS"
    return "see the Graph error above"


def run_checks(settings: Settings, config_file: Path | None) -> Iterator[Check]:
    yield Check("configuration", True, f"loaded from {config_file or 'the environment'}")
    store = BlobStore.from_settings(settings.storage)
    stores = [store]
    if settings.output.container:
        stores.append(BlobStore.from_settings(settings.storage, container=settings.output.container))
    storage_ok = True
    for each in stores:
        check = _check_container(each)
        storage_ok &= check.ok
        yield check
    if settings.output.tables:
        yield _check_tables(settings)
    caches = TokenCaches.from_settings(settings, store)
    if storage_ok:
        for tenant in caches.tenants:
            report = caches[tenant].inspect_blob()
            problem = report.get("problem")
            unreadable = bool(problem and problem.startswith("unreadable"))
            yield Check(
                f"token cache {tenant}",
                not unreadable,
                problem or f"{report['blob']} readable",
                "the blob was written with another encryption key: give every replica the same "
                "storage.encryption_key_file (it will be replaced by the next write)"
                if unreadable
                else None,
            )
    graph = GraphClient(
        settings.graph.endpoint,
        settings.graph.api_version,
        caches,
        timeout=settings.graph.timeout_seconds,
        max_retries=1,
    )
    for tenant in settings.identity.tenants:
        check = _check_token(settings, tenant)
        yield check
        if not check.ok:
            continue
        for job in settings.jobs:
            if tenant in settings.job_tenants(job):
                yield _check_graph(graph, tenant, job.resource)


def _check_container(store: BlobStore) -> Check:
    probe = f"check/{replica_name()}.probe"
    try:
        store.ensure_container()
        try:
            store.write(probe, b"graphsync check", if_match=None)
        except WriteConflict:  # left over from an interrupted check
            store.delete(probe)
            store.write(probe, b"graphsync check", if_match=None)
        store.delete(probe)
    except StorageError as exc:
        return Check(f"storage {store.container_name}", False, str(exc), storage_fix(exc))
    return Check(f"storage {store.container_name}", True, "reachable and writable")


def _check_tables(settings: Settings) -> Check:
    """Write and delete a probe table where the tables live, with delta-rs and its storage options: the very client
    and credentials the rounds commit with (not the Azure SDK's)."""
    try:
        root = probe_tables(settings, replica_name())
    except Exception as exc:  # whatever delta-rs raises, the check reports it with the fix
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if settings.output.directory is not None:
            fix = f"make {settings.output.directory}/tables a directory the user graphsync runs as can create files in"
        else:
            fix = (
                f"give the identity 'Storage Blob Data Contributor' on container {settings.output.container} (or "
                "check the account key / SAS in storage.connection_string): the tables are written with the "
                "[storage] account's credentials"
            )
        return Check("tables", False, detail, fix)
    return Check("tables", True, f"{root}: writable (a probe table written and deleted)")


def _check_token(settings: Settings, tenant: str) -> Check:
    """Ask the identity provider itself, with a throwaway cache: the point is to test the credential."""
    session = retrying_session(total=2, statuses=TRANSIENT_STATUSES)
    try:
        app = build_application(settings.identity, tenant, msal.SerializableTokenCache(), session)
        result = app.acquire_token_for_client(settings.identity.scopes)
    except Exception as exc:  # reported as a failed check, like any other credential problem
        result = failure_result(exc)
    if "access_token" in result:
        return Check(f"token {tenant}", True, f"issued by {settings.identity.authority_host}")
    error = TokenError.from_result(tenant, result)
    return Check(f"token {tenant}", False, str(error), token_fix(error))


def _check_graph(graph: GraphClient, tenant: str, resource: str) -> Check:
    name = f"graph {tenant} {resource}"
    try:
        graph.get_json(tenant, graph.collection_url(resource, top=None if resource in SINGLETONS else 1))
    except TokenError as exc:
        return Check(name, False, str(exc), token_fix(exc))
    except GraphError as exc:
        return Check(name, False, str(exc), graph_fix(exc, resource))
    return Check(name, True, "readable")
