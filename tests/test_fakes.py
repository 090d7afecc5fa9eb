"""Prove the fakes and fixtures behave like the real services, using the real client libraries.

If these fail, every daemon test built on them is meaningless, so they also pin down the
MSAL behaviours the daemon's identity and cache code relies on (discovery, realm, caching,
throttling of failed requests, proactive refresh).
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import msal
import pytest
import requests
import trustme
from azure.core.exceptions import ServiceRequestError
from azure.storage.blob import BlobServiceClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra, tenant_id

if TYPE_CHECKING:
    from tests.conftest import Azurite, WriteConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
TENANT = "contoso.onmicrosoft.com"
GRAPH = ["https://graph.microsoft.com/.default"]


def make_app(
    fake: FakeEntra, credential: Any = CLIENT_SECRET, *, tenant: str = TENANT, client_id: str = CLIENT_ID
) -> msal.ConfidentialClientApplication:
    """A fresh MSAL app, i.e. a fresh token cache and a fresh MSAL HTTP (throttling) cache."""
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=f"{fake.authority_host}/{tenant}",
        instance_discovery=False,
    )


class Certificate:
    """A self-signed RSA certificate, as an app registration's uploaded credential."""

    def __init__(self, common_name: str = "graphsync-test") -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.key_pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.sha1 = self.cert.fingerprint(hashes.SHA1()).hex()


@pytest.fixture(scope="module")
def certificate() -> Certificate:
    return Certificate()


@pytest.fixture
def cert_entra(ca: trustme.CA, certificate: Certificate, tls_env: dict[str, str]) -> Iterator[FakeEntra]:
    with FakeEntra(ca, client_id=CLIENT_ID, certificate_pem=certificate.cert_pem) as fake:
        yield fake


# -- discovery ---------------------------------------------------------------------------


def test_discovery_maps_domain_tenant_to_guid(fake_entra: FakeEntra) -> None:
    guid = str(uuid.uuid5(uuid.NAMESPACE_DNS, TENANT))
    doc = requests.get(f"{fake_entra.authority_host}/{TENANT}/v2.0/.well-known/openid-configuration").json()
    assert doc["token_endpoint"] == f"{fake_entra.authority_host}/{guid}/oauth2/v2.0/token"
    assert doc["issuer"] == f"{fake_entra.authority_host}/{guid}/v2.0"

    other = str(uuid.uuid4())
    doc = requests.get(f"{fake_entra.authority_host}/{other}/v2.0/.well-known/openid-configuration").json()
    assert doc["token_endpoint"] == f"{fake_entra.authority_host}/{other}/oauth2/v2.0/token"

    app = make_app(fake_entra)
    # MSAL's realm (a token cache key) is the tenant segment of the *discovered* token endpoint.
    assert app.authority.tenant == guid == tenant_id(TENANT)
    assert app.authority.instance == "127.0.0.1"  # hostname only: the port is not part of the cache key
    assert fake_entra.discovery_requests(TENANT) == 2
    assert fake_entra.discovery_requests(guid) == 2  # a GUID matches the domain name it stands for
    assert fake_entra.discovery_requests() == 3


# -- client secret -----------------------------------------------------------------------


def test_secret_token_is_issued_once_then_served_from_msal_cache(fake_entra: FakeEntra) -> None:
    app = make_app(fake_entra)
    first = app.acquire_token_for_client(GRAPH)
    assert first["token_source"] == "identity_provider", first
    assert first["expires_in"] == 3600
    assert first["access_token"].startswith("fake-at-")

    second = app.acquire_token_for_client(GRAPH)
    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]

    [request] = fake_entra.token_requests()
    assert request.tenant == TENANT  # mapped back from the GUID MSAL actually posted to
    assert request.client_id == CLIENT_ID
    assert request.grant_type == "client_credentials"
    assert request.scope == GRAPH[0]
    assert request.auth == "secret"
    assert request.access_token == first["access_token"]
    assert request.status == 200
    assert fake_entra.token_requests("fabrikam.onmicrosoft.com") == []
    assert fake_entra.discovery_requests(TENANT) == 1


def test_wrong_secret_is_invalid_client(fake_entra: FakeEntra) -> None:
    result = make_app(fake_entra, "not-the-secret").acquire_token_for_client(GRAPH)
    assert result["error"] == "invalid_client"
    assert 7000215 in result["error_codes"]
    assert "correlation_id" in result and "trace_id" in result
    [request] = fake_entra.token_requests()
    assert (request.auth, request.access_token, request.status) == ("secret", None, 401)


def test_unknown_client_id_is_unauthorized_client(fake_entra: FakeEntra) -> None:
    other = "99999999-0000-0000-0000-000000000000"
    result = make_app(fake_entra, client_id=other).acquire_token_for_client(GRAPH)
    assert result["error"] == "unauthorized_client"
    assert result["error_codes"] == [700016]
    assert other in result["error_description"]


def test_scope_must_be_dot_default(fake_entra: FakeEntra) -> None:
    result = make_app(fake_entra).acquire_token_for_client(["https://graph.microsoft.com/User.Read.All"])
    assert result["error"] == "invalid_scope"
    assert result["error_codes"] == [1002012]


# -- knobs -------------------------------------------------------------------------------


def test_fail_next_5xx_raises_and_msal_throttles_the_retry(fake_entra: FakeEntra) -> None:
    fake_entra.fail_next(1, status=503, retry_after=30)
    app = make_app(fake_entra)
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        app.acquire_token_for_client(GRAPH)
    # MSAL replays a 5xx/429 from its in-memory HTTP cache for Retry-After (default 5 s)
    # seconds, per (token endpoint, client_id, scope), without asking Entra again.
    with pytest.raises(msal.exceptions.MsalServiceError):
        app.acquire_token_for_client(GRAPH)
    assert len(fake_entra.token_requests()) == 1
    assert fake_entra.token_requests()[0].error == "temporarily_unavailable"

    # The failure was used up: a fresh app (fresh HTTP cache) gets a token.
    assert "access_token" in make_app(fake_entra).acquire_token_for_client(GRAPH)


def test_fail_next_4xx_is_returned_as_error_result(fake_entra: FakeEntra) -> None:
    fake_entra.fail_next(2, status=401, error="invalid_client", description="AADSTS7000222: The secret expired.")
    app = make_app(fake_entra)
    for _ in range(2):
        result = app.acquire_token_for_client(GRAPH)
        assert result["error"] == "invalid_client"
        assert result["error_codes"] == [7000222]
    assert app.acquire_token_for_client(GRAPH)["token_source"] == "identity_provider"
    assert [r.status for r in fake_entra.token_requests()] == [401, 401, 200]


def test_short_expires_in_makes_msal_request_again(fake_entra: FakeEntra) -> None:
    fake_entra.expires_in = 301  # MSAL treats < 300 s left as expired: about 1 s usable
    app = make_app(fake_entra)
    first = app.acquire_token_for_client(GRAPH)
    assert app.acquire_token_for_client(GRAPH)["token_source"] == "cache"
    time.sleep(2.1)
    second = app.acquire_token_for_client(GRAPH)
    assert second["token_source"] == "identity_provider"
    assert second["access_token"] != first["access_token"]
    assert len(fake_entra.token_requests()) == 2


def test_refresh_in_triggers_proactive_refresh(fake_entra: FakeEntra) -> None:
    fake_entra.refresh_in = 1
    app = make_app(fake_entra)
    first = app.acquire_token_for_client(GRAPH)
    assert "refresh_on" in first  # MSAL turns refresh_in into an absolute refresh_on
    cached = app.acquire_token_for_client(GRAPH)
    assert cached["token_source"] == "cache"
    time.sleep(2.1)
    refreshed = app.acquire_token_for_client(GRAPH)
    assert refreshed["token_source"] == "identity_provider"
    assert refreshed["access_token"] != first["access_token"]


def test_latency_delays_token_responses(fake_entra: FakeEntra) -> None:
    fake_entra.latency_seconds = 0.5
    app = make_app(fake_entra)
    started = time.monotonic()
    assert "access_token" in app.acquire_token_for_client(GRAPH)
    assert time.monotonic() - started >= 0.5


def test_is_valid_revoke_expiry_and_reset(fake_entra: FakeEntra) -> None:
    token = make_app(fake_entra).acquire_token_for_client(GRAPH)["access_token"]
    assert fake_entra.is_valid(token)
    assert not fake_entra.is_valid("fake-at-made-up")
    fake_entra.revoke(token)
    assert not fake_entra.is_valid(token)

    fake_entra.expires_in = 1
    short = make_app(fake_entra).acquire_token_for_client(GRAPH)["access_token"]
    assert fake_entra.is_valid(short)
    time.sleep(1.1)
    assert not fake_entra.is_valid(short)

    fake_entra.reset()
    assert fake_entra.token_requests() == []
    assert fake_entra.discovery_requests() == 0


def test_records_are_per_tenant(fake_entra: FakeEntra) -> None:
    guid_tenant = str(uuid.uuid4())
    for tenant in (TENANT, "fabrikam.onmicrosoft.com", guid_tenant):
        assert "access_token" in make_app(fake_entra, tenant=tenant).acquire_token_for_client(GRAPH)
    assert [r.tenant for r in fake_entra.token_requests()] == [TENANT, "fabrikam.onmicrosoft.com", guid_tenant]
    assert len(fake_entra.token_requests("fabrikam.onmicrosoft.com")) == 1
    assert len(fake_entra.token_requests(tenant_id(TENANT))) == 1
    assert len(fake_entra.token_requests(guid_tenant.upper())) == 1


def test_stop_and_start_keep_the_port(fake_entra: FakeEntra) -> None:
    host = fake_entra.authority_host
    fake_entra.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{host}/{TENANT}/v2.0/.well-known/openid-configuration", timeout=2)
    fake_entra.start()
    assert fake_entra.authority_host == host
    assert "access_token" in make_app(fake_entra).acquire_token_for_client(GRAPH)


# -- certificate and federated credentials -----------------------------------------------


@pytest.mark.parametrize("form", ["sha1-thumbprint", "sha256-from-public-certificate", "pfx"])
def test_certificate_credential(cert_entra: FakeEntra, certificate: Certificate, form: str, tmp_path: Path) -> None:
    # MSAL 1.39 has no SHA-256 thumbprint key: "thumbprint" is taken as SHA-1 (RS256 + x5t);
    # without it, MSAL derives x5t#S256 (PS256) from "public_certificate" or from the .pfx.
    if form == "sha1-thumbprint":
        credential = {"private_key": certificate.key_pem, "thumbprint": certificate.sha1}
    elif form == "sha256-from-public-certificate":
        credential = {"private_key": certificate.key_pem, "public_certificate": certificate.cert_pem.decode()}
    else:
        pfx = tmp_path / "app.pfx"
        pfx.write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"app", certificate.key, certificate.cert, None, serialization.BestAvailableEncryption(b"pw")
            )
        )
        credential = {"private_key_pfx_path": str(pfx), "passphrase": "pw"}
    result = make_app(cert_entra, credential).acquire_token_for_client(GRAPH)
    assert "access_token" in result, result
    [request] = cert_entra.token_requests()
    assert (request.auth, request.status) == ("certificate", 200)


def test_certificate_from_another_key_is_rejected(cert_entra: FakeEntra, certificate: Certificate) -> None:
    impostor = Certificate("impostor")
    # Claims the registered certificate's thumbprint but signs with a different key.
    credential = {"private_key": impostor.key_pem, "thumbprint": certificate.sha1}
    result = make_app(cert_entra, credential).acquire_token_for_client(GRAPH)
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]
    assert "signature" in result["error_description"]

    unknown = {"private_key": impostor.key_pem, "thumbprint": impostor.sha1}
    assert make_app(cert_entra, unknown).acquire_token_for_client(GRAPH)["error_codes"] == [700027]
    # A certificate-only app has no secret to match.
    assert make_app(cert_entra, CLIENT_SECRET).acquire_token_for_client(GRAPH)["error_codes"] == [7000215]


def test_certificate_assertion_for_another_audience_is_rejected(
    cert_entra: FakeEntra, certificate: Certificate
) -> None:
    token_endpoint = f"{cert_entra.authority_host}/{tenant_id(TENANT)}/oauth2/v2.0/token"
    now = int(time.time())
    assertion = jwt.encode(
        {"aud": "https://login.microsoftonline.com/x/oauth2/v2.0/token", "iss": CLIENT_ID, "sub": CLIENT_ID,
         "exp": now + 600, "iat": now, "jti": str(uuid.uuid4())},
        certificate.key,
        algorithm="RS256",
        headers={"x5t": jwt.utils.base64url_encode(certificate.cert.fingerprint(hashes.SHA1())).decode()},
    )  # fmt: skip
    response = requests.post(
        token_endpoint,
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "scope": GRAPH[0],
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json()["error_codes"] == [700027]
    assert "aud" in response.json()["error_description"].lower()


def test_federated_credential(ca: trustme.CA, tls_env: dict[str, str]) -> None:
    federated = "eyJhbGciOiJSUzI1NiJ9.workload-identity.sig"
    with FakeEntra(ca, client_id=CLIENT_ID, federated_token=federated) as fake:
        result = make_app(fake, {"client_assertion": lambda: federated}).acquire_token_for_client(GRAPH)
        assert "access_token" in result, result
        wrong = make_app(fake, {"client_assertion": lambda: "other"}).acquire_token_for_client(GRAPH)
        assert wrong["error"] == "invalid_client"
        assert wrong["error_codes"] == [700027]
        assert [(r.auth, r.status) for r in fake.token_requests()] == [("federated", 200), ("certificate", 401)]


@pytest.mark.integration  # runs the fake as a subprocess
def test_standalone_entra(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.fakes.entra", "--port", "0", "--cert-dir", str(tmp_path),
               "--client-id", "demo-app", "--client-secret", "demo-secret"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        host = process.stdout.readline().strip()
        assert host.startswith("https://127.0.0.1:"), process.stderr and process.stderr.read()
        response = requests.post(
            f"{host}/{TENANT}/oauth2/v2.0/token",
            data={"grant_type": "client_credentials", "client_id": "demo-app", "client_secret": "demo-secret",
                  "scope": GRAPH[0]},
            verify=str(tmp_path / "ca.pem"),
            timeout=10,
        )  # fmt: skip
        assert response.status_code == 200, response.text
    finally:
        process.terminate()
        process.communicate(timeout=10)


# -- Azurite and config ------------------------------------------------------------------


def test_azurite_blob_survives_restart(azurite: Azurite, blob_container: str) -> None:
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    blob = service.get_blob_client(blob_container, "msal-cache.json")
    blob.upload_blob(b'{"AccessToken": {}}')
    assert blob.download_blob().readall() == b'{"AccessToken": {}}'

    azurite.stop()
    assert not azurite.running
    impatient = BlobServiceClient.from_connection_string(
        azurite.connection_string, retry_total=0, connection_timeout=2, read_timeout=2
    )
    started = time.monotonic()
    with pytest.raises(ServiceRequestError):
        impatient.get_blob_client(blob_container, "msal-cache.json").download_blob()
    assert time.monotonic() - started < 5

    azurite.start()
    assert azurite.running
    assert blob.download_blob().readall() == b'{"AccessToken": {}}'


def test_a_test_may_leave_azurite_stopped(azurite: Azurite, blob_container: str) -> None:
    """An outage test that forgets to restart; the next test's blob_container must recover."""
    azurite.stop()


def test_blob_container_restarts_azurite(azurite: Azurite, blob_container: str) -> None:
    assert azurite.running
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    assert list(service.get_container_client(blob_container).list_blobs()) == []


def test_graphsync_config(
    graphsync_config: WriteConfig, fake_entra: FakeEntra, azurite: Azurite, blob_container: str, tmp_path: Path
) -> None:
    default = tomllib.loads(graphsync_config().read_text())
    assert default == {
        "identity": {
            "client_id": CLIENT_ID,
            "tenants": [TENANT],
            "authority_host": fake_entra.authority_host,
            "client_secret": CLIENT_SECRET,
        },
        "storage": {"connection_string": azurite.connection_string, "container": blob_container},
    }

    awkward = 'quote " backslash \\ newline \n tab \t del \x7f bell \x07 é 🚀'
    path = graphsync_config(
        "replica-b/config.toml",
        tenants=[TENANT, "fabrikam.onmicrosoft.com"],
        extra={
            "identity": {"client_secret": None, "certificate_path": tmp_path / "cert.pem"},
            "cache": {"lease_seconds": 15, "jitter": 0.25, "enabled": False, "blob": awkward},
            "graph": {"retry": {"statuses": ["429", "503"], "max": 3}},
            "dotted.key": {"x": 1},
        },
    )
    assert path == tmp_path / "replica-b" / "config.toml"
    doc = tomllib.loads(path.read_text())
    assert "client_secret" not in doc["identity"]
    assert doc["identity"]["tenants"] == [TENANT, "fabrikam.onmicrosoft.com"]
    assert doc["identity"]["certificate_path"] == str(tmp_path / "cert.pem")
    assert doc["cache"] == {"lease_seconds": 15, "jitter": 0.25, "enabled": False, "blob": awkward}
    assert doc["graph"] == {"retry": {"statuses": ["429", "503"], "max": 3}}
    assert doc["dotted.key"] == {"x": 1}
    assert doc["storage"]["container"] == blob_container
