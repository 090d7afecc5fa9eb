"""A managed identity as the app's federated credential, against a fake managed identity endpoint and the fake Entra.

The fake speaks the App Service / Container Apps protocol azure-identity uses when ``IDENTITY_ENDPOINT`` and
``IDENTITY_HEADER`` are set: ``GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=...[&client_id=...]`` with
the ``X-IDENTITY-HEADER`` header, answered with ``access_token``, ``expires_on`` (epoch seconds), ``resource`` and
``token_type``. The token it issues is the one the fake Entra accepts as the federated client assertion.
"""

from __future__ import annotations

import json
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trustme

from graphsync import identity
from graphsync.config import ConfigError, ManagedIdentityCredential, load_settings
from graphsync.storage import BlobStore
from graphsync.tokencache import TokenCaches
from tests.fakes.entra import CLIENT_ID, FakeEntra

if TYPE_CHECKING:
    from tests.conftest import RunGraphsync, WriteConfig

TENANT = "contoso.onmicrosoft.com"
MI_CLIENT_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
EXCHANGE_RESOURCE = "api://AzureADTokenExchange"


@dataclass(frozen=True)
class MiRequest:
    path: str
    params: dict[str, str]
    identity_header: str | None


class FakeManagedIdentityEndpoint:
    """The local endpoint App Service and Container Apps expose to a resource with managed identities (plain HTTP).

    Knows one user-assigned identity (``client_id``) and, optionally, a system-assigned one; a token request for
    any other identity gets the platform's 400.
    """

    def __init__(self, *, client_id: str = MI_CLIENT_ID, system_assigned: bool = False) -> None:
        self.client_id = client_id
        self.system_assigned = system_assigned
        self.header_secret = "identity-header-" + secrets.token_urlsafe(12)
        self.token = "fake-mi-token-" + secrets.token_urlsafe(24)
        self._lock = threading.Lock()
        self._requests: list[MiRequest] = []
        self._server = _Server(("127.0.0.1", 0), self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/msi/token"

    @property
    def env(self) -> dict[str, str]:
        return {"IDENTITY_ENDPOINT": self.url, "IDENTITY_HEADER": self.header_secret}

    def requests(self) -> list[MiRequest]:
        with self._lock:
            return list(self._requests)

    def __enter__(self) -> FakeManagedIdentityEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def handle(self, path: str, identity_header: str | None) -> tuple[int, dict[str, Any]]:
        split = urlsplit(path)
        params = {key: values[0] for key, values in parse_qs(split.query).items()}
        with self._lock:
            self._requests.append(MiRequest(split.path, params, identity_header))
        if identity_header != self.header_secret:
            return 401, {"statusCode": 401, "message": "Unauthorized: X-IDENTITY-HEADER is missing or wrong."}
        if params.get("api-version") != "2019-08-01" or not params.get("resource"):
            return 400, {"statusCode": 400, "message": "api-version 2019-08-01 and resource are required."}
        known = params.get("client_id") == self.client_id if "client_id" in params else self.system_assigned
        if not known:
            return 400, {
                "statusCode": 400,
                "message": "No User Assigned or Delegated Managed Identity found for "
                "specified ClientId/ResourceId/PrincipalId.",
            }
        return 200, {
            "access_token": self.token,
            "expires_on": str(int(time.time()) + 86400),
            "resource": params["resource"],
            "token_type": "Bearer",
            "client_id": params.get("client_id", "system-assigned-client-id"),
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakeManagedIdentityEndpoint) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self) -> None:  # skip HTTPServer's reverse DNS lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: _Server

    def do_GET(self) -> None:
        status, body = self.server.fake.handle(self.path, self.headers.get("X-IDENTITY-HEADER"))
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def mi_endpoint() -> Iterator[FakeManagedIdentityEndpoint]:
    with FakeManagedIdentityEndpoint(system_assigned=True) as endpoint:
        yield endpoint


@pytest.fixture
def mi_entra(ca: trustme.CA, tls_env: dict[str, str], mi_endpoint: FakeManagedIdentityEndpoint) -> Iterator[FakeEntra]:
    """A fake Entra whose app trusts the fake endpoint's managed identity (its token is the federated assertion)."""
    with FakeEntra(ca, client_id=CLIENT_ID, federated_token=mi_endpoint.token) as entra:
        yield entra


def _mi_config(graphsync_config: WriteConfig, entra: FakeEntra, value: str = MI_CLIENT_ID, **kwargs: Any) -> str:
    extra = {
        "identity": {"client_secret": None, "managed_identity_client_id": value, "authority_host": entra.authority_host}
    }
    return str(graphsync_config(extra=extra, **kwargs))


def _report(output: str) -> dict[str, Any]:
    return json.loads(output.strip().splitlines()[-1])


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- signing in with the managed identity's token ---------------------------------------------------------------


@pytest.mark.parametrize(("configured", "expected_client_id"), [(MI_CLIENT_ID, MI_CLIENT_ID), ("system", None)])
def test_token_is_exchanged_for_the_managed_identity_token(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    mi_endpoint: FakeManagedIdentityEndpoint,
    mi_entra: FakeEntra,
    configured: str,
    expected_client_id: str | None,
) -> None:
    config = _mi_config(graphsync_config, mi_entra, configured)
    result = run_graphsync("token", "--json", "--config", config, env=mi_endpoint.env)
    assert result.returncode == 0, result.stderr
    assert _report(result.stdout)["source"] == "identity_provider"
    assert [(r.auth, r.status, r.client_id) for r in mi_entra.token_requests()] == [("federated", 200, CLIENT_ID)]
    [request] = mi_endpoint.requests()
    assert request.params.get("resource") == EXCHANGE_RESOURCE
    assert request.params.get("api-version") == "2019-08-01"
    assert request.params.get("client_id") == expected_client_id
    assert request.identity_header == mi_endpoint.header_secret


def test_one_managed_identity_token_serves_every_tenant(
    graphsync_config: WriteConfig,
    mi_endpoint: FakeManagedIdentityEndpoint,
    mi_entra: FakeEntra,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One credential per process: azure-identity's cached token is reused by each tenant's MSAL client."""
    for name, value in mi_endpoint.env.items():
        monkeypatch.setenv(name, value)
    identity._managed_identity_credential.cache_clear()  # built from the environment: not one from another test
    tenants = [TENANT, "fabrikam.onmicrosoft.com"]
    try:
        settings = load_settings(Path(_mi_config(graphsync_config, mi_entra, tenants=tenants)))
        caches = TokenCaches.from_settings(settings, BlobStore.from_settings(settings.storage))
        first = caches.acquire(TENANT)
        caches.acquire("fabrikam.onmicrosoft.com")
        again = caches.acquire(TENANT, rejected=first.token)  # forces a new request to Entra
    finally:
        identity._managed_identity_credential.cache_clear()
    assert again.source == "identity_provider"
    assert [(r.tenant, r.auth, r.status) for r in mi_entra.token_requests()] == [
        (TENANT, "federated", 200),
        ("fabrikam.onmicrosoft.com", "federated", 200),
        (TENANT, "federated", 200),
    ]
    assert len(mi_endpoint.requests()) == 1


def test_debug_logging_never_prints_the_managed_identity_token(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    mi_endpoint: FakeManagedIdentityEndpoint,
    mi_entra: FakeEntra,
) -> None:
    env = {**mi_endpoint.env, "GRAPHSYNC_LOG_LEVEL": "DEBUG"}
    result = run_graphsync("token", "--config", _mi_config(graphsync_config, mi_entra), env=env)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert '"level": "DEBUG"' in text, "debug logging was not on, so this test would prove nothing"
    assert mi_endpoint.token not in text
    assert mi_endpoint.header_secret not in text


# -- a managed identity that gives no token ---------------------------------------------------------------------


def test_managed_identity_endpoint_down_is_a_clear_token_error(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    mi_entra: FakeEntra,
) -> None:
    down = {"IDENTITY_ENDPOINT": f"http://127.0.0.1:{_closed_port()}/msi/token", "IDENTITY_HEADER": "secret"}
    result = run_graphsync("token", "--config", _mi_config(graphsync_config, mi_entra), env=down)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "managed_identity_unavailable" in result.stderr
    assert f"no token from the managed identity {MI_CLIENT_ID}" in result.stderr
    assert "Traceback" not in result.stderr
    assert mi_entra.token_requests() == [], "without an assertion nothing should reach Entra"


def test_unknown_managed_identity_is_a_clear_token_error(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    mi_endpoint: FakeManagedIdentityEndpoint,
    mi_entra: FakeEntra,
) -> None:
    other = "99999999-8888-7777-6666-555555555555"
    result = run_graphsync("token", "--config", _mi_config(graphsync_config, mi_entra, other), env=mi_endpoint.env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"managed_identity_unavailable: no token from the managed identity {other}" in result.stderr
    assert "No User Assigned or Delegated Managed Identity found" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_names_the_fix_for_a_missing_managed_identity(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    mi_entra: FakeEntra,
) -> None:
    endpoint = FakeManagedIdentityEndpoint(client_id="99999999-8888-7777-6666-555555555555")
    with endpoint:
        result = run_graphsync("check", "--json", "--config", _mi_config(graphsync_config, mi_entra), env=endpoint.env)
    assert result.returncode == 1, result.stdout + result.stderr
    [token] = [c for c in _report(result.stdout)["checks"] if c["name"] == f"token {TENANT}"]
    assert not token["ok"] and f"managed identity {MI_CLIENT_ID}" in token["detail"]
    assert "identity.managed_identity_client_id" in token["fix"]


def test_untrusted_managed_identity_gets_the_federated_credential_fix(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    mi_endpoint: FakeManagedIdentityEndpoint,
    mi_entra: FakeEntra,
) -> None:
    mi_entra.fail_next(
        1,
        status=400,
        error="invalid_client",
        description=("AADSTS70021: No matching federated identity record found for presented assertion."),
    )
    result = run_graphsync("check", "--json", "--config", _mi_config(graphsync_config, mi_entra), env=mi_endpoint.env)
    assert result.returncode == 1, result.stdout + result.stderr
    [token] = [c for c in _report(result.stdout)["checks"] if c["name"] == f"token {TENANT}"]
    assert "AADSTS70021" in token["detail"] and "for a managed identity" in token["fix"]


# -- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["not-a-guid", "", "System-Assigned", f"{{{MI_CLIENT_ID}}}"])
def test_bad_managed_identity_client_id_is_a_config_error(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    fake_entra: FakeEntra,
    value: str,
) -> None:
    config = _mi_config(graphsync_config, fake_entra, value)
    result = run_graphsync("token", "--config", config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"identity.managed_identity_client_id (from {config}): expected a user-assigned managed identity's "
        "client id (a GUID)" in result.stderr
    )
    assert value == "" or value not in result.stderr, "values are never echoed"


def test_managed_identity_and_client_secret_conflict(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    fake_entra: FakeEntra,
) -> None:
    config = str(graphsync_config())  # has a client_secret
    result = run_graphsync(
        "token", "--config", config, env={"GRAPHSYNC_IDENTITY__MANAGED_IDENTITY_CLIENT_ID": MI_CLIENT_ID}
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "conflicting keys" in result.stderr
    assert f"identity.client_secret (from {config})" in result.stderr
    assert (
        "identity.managed_identity_client_id (from env GRAPHSYNC_IDENTITY__MANAGED_IDENTITY_CLIENT_ID)" in result.stderr
    )
    assert "set exactly one credential" in result.stderr


STORAGE = '[storage]\naccount_url = "https://example.blob.core.windows.net"\n'


def test_managed_identity_from_the_environment_alone(tmp_path: Path) -> None:
    path = tmp_path / "graphsync.toml"
    path.write_text(f'[identity]\nclient_id = "{CLIENT_ID}"\ntenants = ["{TENANT}"]\n' + STORAGE)

    identity_settings = load_settings(
        path, {"GRAPHSYNC_IDENTITY__MANAGED_IDENTITY_CLIENT_ID": MI_CLIENT_ID.upper()}
    ).identity

    assert isinstance(identity_settings.credential, ManagedIdentityCredential)
    assert identity_settings.managed_identity_client_id == MI_CLIENT_ID
    assert (
        load_settings(
            path, {"GRAPHSYNC_IDENTITY__MANAGED_IDENTITY_CLIENT_ID": "SYSTEM"}
        ).identity.managed_identity_client_id
        == "system"
    )


def test_workload_identity_variables_are_ignored_with_a_managed_identity(tmp_path: Path) -> None:
    """In Container Apps AZURE_CLIENT_ID conventionally names the managed identity, not graphsync's app."""
    token_file = tmp_path / "token"
    token_file.write_text("a-jwt")
    path = tmp_path / "graphsync.toml"
    path.write_text(f'[identity]\ntenants = ["{TENANT}"]\nmanaged_identity_client_id = "{MI_CLIENT_ID}"\n' + STORAGE)
    environ = {
        "AZURE_CLIENT_ID": MI_CLIENT_ID,
        "AZURE_TENANT_ID": "44444444-4444-4444-4444-444444444444",
        "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
    }

    with pytest.raises(ConfigError) as info:
        load_settings(path, environ)
    assert "identity.client_id (not set): required" in str(info.value)

    identity_settings = load_settings(path, {**environ, "GRAPHSYNC_IDENTITY__CLIENT_ID": CLIENT_ID}).identity
    assert (identity_settings.client_id, identity_settings.tenants) == (CLIENT_ID, [TENANT])
    assert identity_settings.federated_token_file is None
    assert isinstance(identity_settings.credential, ManagedIdentityCredential)
