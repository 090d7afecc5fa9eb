"""A local HTTPS fake of the Entra ID (v2) discovery and token endpoints.

Why a fake rather than mocks: the daemon talks to Entra only through MSAL, and MSAL does
its own tenant discovery, client-assertion signing, HTTP throttling and token caching.
Serving real HTTP(S) lets the real MSAL (and subprocesses running the real daemon) exercise
all of that, while the test keeps control of lifetimes, failures and latency and can count
exactly how many tokens were requested -- the number a shared token cache exists to keep low.

Only what app-only (client-credential) flows use is implemented:

* ``GET  /{tenant}/v2.0/.well-known/openid-configuration``
* ``POST /{tenant}/oauth2/v2.0/token`` with ``grant_type=client_credentials`` and a client
  secret, a certificate-signed client assertion or a federated (workload identity) assertion.

Run standalone for a demo::

    python -m tests.fakes.entra --port 8443 --cert-dir .demo/entra --client-id X --client-secret Y
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.fakes.https import FakeHttpServer, Knob, LoopbackHttpsServer

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "JWT_BEARER",
    "FakeEntra",
    "TokenRequest",
    "tenant_id",
]

logger = logging.getLogger(__name__)

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "fake-client-secret-Zq9"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

# Entra keeps these multi-tenant aliases as they are in discovered endpoints.
_TENANT_ALIASES = frozenset({"common", "organizations", "consumers"})
_DISCOVERY_PATH = re.compile(r"^/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration$")
_TOKEN_PATH = re.compile(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/token$")
_AADSTS_CODE = re.compile(r"AADSTS(\d+)")

# Error descriptions as Entra words them (trace/correlation ids and a timestamp get appended).
_OUTAGE = "AADSTS50000: There was an error issuing a token or an issue with our sign-in service."
_UNSUPPORTED_GRANT = "AADSTS70003: The app requested an unsupported grant type '{}'."
_UNKNOWN_APP = (
    "AADSTS700016: Application with identifier '{}' was not found in the directory 'Fake Tenant'. "
    "This can happen if the application has not been installed by the administrator of the tenant "
    "or consented to by any user in the tenant. You may have sent your authentication request to "
    "the wrong tenant."
)
_BAD_SCOPE = (
    "AADSTS1002012: The provided value for scope {} is not valid. Client credential flows must have "
    "a scope value with /.default suffixed to the resource identifier (application ID URI)."
)
_BAD_SECRET = (
    "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is "
    "the client secret value, not the client secret ID, for a secret added to app '{}'."
)
_NO_CREDENTIAL = (
    "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'."
)


def tenant_id(tenant: str) -> str:
    """Return the GUID Entra would put in discovered endpoints for ``tenant``.

    Real Entra answers discovery for ``contoso.onmicrosoft.com`` with endpoints under the
    tenant's GUID, and MSAL takes the cache "realm" from that token endpoint.  The fake
    derives a stable GUID (uuid5 of the lower-cased name) so tests can predict it.
    """
    if tenant.lower() in _TENANT_ALIASES:
        return tenant.lower()
    try:
        return str(uuid.UUID(tenant))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, tenant.lower()))


@dataclass(frozen=True)
class TokenRequest:
    """One POST to the token endpoint, as the fake saw and answered it.

    ``tenant`` is the tenant as the client configured it (a GUID in the URL is mapped back
    to the domain name it was discovered under).  ``auth`` is the kind of credential the
    client presented ("secret", "certificate", "federated"; None when it sent none);
    ``access_token`` is None when the request failed, and then ``error`` says why.
    """

    tenant: str
    time: float
    client_id: str | None
    grant_type: str | None
    scope: str | None
    auth: str | None
    access_token: str | None
    status: int
    error: str | None


@dataclass(frozen=True)
class _Failure:
    status: int
    error: str
    description: str
    retry_after: int | None


@dataclass(frozen=True)
class _Reply:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str]


class FakeEntra(LoopbackHttpsServer):
    """A started-on-demand HTTPS server that behaves like Entra ID for client credentials.

    Knobs (``expires_in``, ``refresh_in``, ``latency_seconds``, :meth:`fail_next`) may be
    changed from the test thread at any time; they apply to the next token request.
    """

    def __init__(
        self,
        ca: trustme.CA,
        *,
        client_id: str,
        client_secret: str | None = None,
        certificate_pem: bytes | None = None,
        federated_token: str | None = None,
        expires_in: int = 3600,
        refresh_in: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.client_id = client_id
        super().__init__(ca, _Handler, name="fake-entra", host=host, port=port)
        self._client_secret = client_secret
        self._federated_token = federated_token
        self._certificate = x509.load_pem_x509_certificate(certificate_pem) if certificate_pem is not None else None

        self._lock = threading.Lock()
        self._expires_in = expires_in
        self._refresh_in = refresh_in
        self._latency_seconds = 0.0
        self._failures: collections.deque[_Failure] = collections.deque()
        self._token_requests: list[TokenRequest] = []
        self._discoveries: list[str] = []
        self._tenant_names: dict[str, str] = {}  # GUID -> domain name it was discovered as
        self._issued: dict[str, float] = {}  # access token -> expiry (time.time())

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def authority_host(self) -> str:
        """``https://HOST:PORT``; append ``/<tenant>`` to get an MSAL authority."""
        return self.url

    # -- knobs ---------------------------------------------------------------------------

    federated_token: Knob[str | None] = Knob(
        "The accepted workload-identity assertion; set it to rotate, as the kubelet rotates the projected token file."
    )

    expires_in: Knob[int] = Knob("Lifetime in seconds of the tokens issued from now on.")

    refresh_in: Knob[int | None] = Knob("``refresh_in`` of the tokens issued from now on (MSAL's proactive refresh).")

    latency_seconds: Knob[float] = Knob("Seconds every request waits before it is answered.")

    def fail_next(
        self,
        count: int,
        status: int = 500,
        error: str = "temporarily_unavailable",
        description: str = _OUTAGE,
        *,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``count`` token requests with an Entra-shaped error.

        Failures are served before any validation, like an outage would.  ``retry_after``
        adds a ``Retry-After`` header, which MSAL uses as its throttling window.
        """
        with self._lock:
            self._failures.extend([_Failure(status, error, description, retry_after)] * count)

    # -- records ---------------------------------------------------------------------------

    def token_requests(self, tenant: str | None = None) -> list[TokenRequest]:
        """Token requests so far, oldest first; ``tenant`` matches by name or GUID."""
        with self._lock:
            records = list(self._token_requests)
        if tenant is None:
            return records
        wanted = tenant_id(tenant)
        return [r for r in records if tenant_id(r.tenant) == wanted]

    def discovery_requests(self, tenant: str | None = None) -> int:
        """How many OpenID configuration documents were served (for ``tenant``)."""
        with self._lock:
            tenants = list(self._discoveries)
        if tenant is None:
            return len(tenants)
        wanted = tenant_id(tenant)
        return sum(1 for t in tenants if tenant_id(t) == wanted)

    def is_valid(self, access_token: str) -> bool:
        """True for a token this fake issued that is neither revoked nor past its expiry."""
        with self._lock:
            expires_at = self._issued.get(access_token)
        return expires_at is not None and time.time() < expires_at

    def revoke(self, access_token: str) -> None:
        """Make ``access_token`` invalid, e.g. to provoke a 401 from a Graph fake."""
        with self._lock:
            self._issued.pop(access_token, None)

    def reset(self) -> None:
        """Forget recorded requests; issued tokens and pending failures are kept."""
        with self._lock:
            self._token_requests.clear()
            self._discoveries.clear()

    # -- request handling (called from server threads) -------------------------------------

    def _handle_get(self, path: str) -> _Reply:
        match = _DISCOVERY_PATH.match(urlsplit(path).path)
        if not match:
            return _Reply(404, {"error": "not_found", "error_description": f"No such path: {path}"}, {})
        tenant = match["tenant"]
        tid = tenant_id(tenant)
        with self._lock:
            self._discoveries.append(tenant)
            if tid != tenant.lower():
                self._tenant_names[tid] = tenant
        return _Reply(200, self._openid_configuration(tid), {})

    def _openid_configuration(self, tid: str) -> dict[str, Any]:
        base = f"{self.authority_host}/{tid}"
        issuer_tenant = "{tenantid}" if tid in _TENANT_ALIASES else tid
        return {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{self.authority_host}/{issuer_tenant}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }

    def _handle_token(self, path: str, body: bytes, headers: Mapping[str, str]) -> _Reply:
        """Answer one token request and record it; ``headers`` has lower-cased names."""
        received = time.time()
        match = _TOKEN_PATH.match(urlsplit(path).path)
        if not match:
            return _Reply(404, {"error": "not_found", "error_description": f"No such path: {path}"}, {})
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        with self._lock:
            tenant = self._tenant_names.get(match["tenant"].lower(), match["tenant"])
            latency = self._latency_seconds
            failure = self._failures.popleft() if self._failures else None
        if latency > 0:
            time.sleep(latency)

        correlation_id = headers.get("client-request-id") or str(uuid.uuid4())
        auth = self._presented_auth(form)
        if failure is not None:
            reply = self._error(failure.status, failure.error, failure.description, correlation_id)
            if failure.retry_after is not None:
                reply = _Reply(reply.status, reply.body, {"Retry-After": str(failure.retry_after)})
        else:
            # A client assertion's audience must be the URL the client posted to.
            audience = f"https://{headers.get('host') or f'{self.host}:{self.port}'}{urlsplit(path).path}"
            reply = self._validate(form, audience, correlation_id) or self._issue(tenant)

        access_token = reply.body.get("access_token") if reply.status == 200 else None
        record = TokenRequest(
            tenant=tenant,
            time=received,
            client_id=form.get("client_id"),
            grant_type=form.get("grant_type"),
            scope=form.get("scope"),
            auth=auth,
            access_token=access_token,
            status=reply.status,
            error=None if access_token else reply.body.get("error"),
        )
        with self._lock:
            self._token_requests.append(record)
        logger.info("token request tenant=%s auth=%s -> %s %s", tenant, auth, reply.status, record.error or "issued")
        return reply

    def _presented_auth(self, form: Mapping[str, str]) -> str | None:
        if form.get("client_secret"):
            return "secret"
        assertion = form.get("client_assertion")
        if not assertion:
            return None
        if self._federated_token is not None and hmac.compare_digest(assertion, self._federated_token):
            return "federated"
        return "certificate"

    def _validate(self, form: Mapping[str, str], audience: str, correlation_id: str) -> _Reply | None:
        """Return the error Entra would give for this request, or None if it is acceptable."""

        def fail(status: int, error: str, description: str) -> _Reply:
            return self._error(status, error, description, correlation_id)

        grant_type = form.get("grant_type")
        if not grant_type:
            return fail(400, "invalid_request", _missing("grant_type"))
        if grant_type != "client_credentials":
            return fail(400, "unsupported_grant_type", _UNSUPPORTED_GRANT.format(grant_type))
        client_id = form.get("client_id")
        if not client_id:
            return fail(400, "invalid_request", _missing("client_id"))
        if client_id != self.client_id:
            return fail(400, "unauthorized_client", _UNKNOWN_APP.format(client_id))
        scope = form.get("scope")
        if not scope:
            return fail(400, "invalid_request", _missing("scope"))
        if not all(s.endswith("/.default") for s in scope.split()):
            return fail(400, "invalid_scope", _BAD_SCOPE.format(scope))

        secret = form.get("client_secret")
        assertion = form.get("client_assertion")
        if secret:
            if self._client_secret is not None and hmac.compare_digest(secret, self._client_secret):
                return None
            return fail(401, "invalid_client", _BAD_SECRET.format(client_id))
        if not assertion:
            return fail(401, "invalid_client", _NO_CREDENTIAL)
        problem = self._assertion_problem(form, client_id, audience)
        if problem is None:
            return None
        return fail(401, "invalid_client", f"AADSTS700027: {problem}")

    def _assertion_problem(self, form: Mapping[str, str], client_id: str, audience: str) -> str | None:
        """Why a client assertion is unacceptable, or None if it is a valid credential."""
        if form.get("client_assertion_type") != JWT_BEARER:
            return f"client_assertion_type must be '{JWT_BEARER}'."
        assertion = form["client_assertion"]
        if self._federated_token is not None and hmac.compare_digest(assertion, self._federated_token):
            return None
        if self._certificate is None:
            return "Client assertion failed signature validation. The application has no certificate."
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            return f"Client assertion is not a valid JWT: {exc}."
        if not (
            _thumbprint_matches(header.get("x5t"), self._certificate, hashes.SHA1())
            or _thumbprint_matches(header.get("x5t#S256"), self._certificate, hashes.SHA256())
        ):
            return (
                "The certificate with identifier used to sign the client assertion is not registered on "
                "application. [Reason - The key was not found.]"
            )
        try:
            jwt.decode(
                assertion,
                # public_key() is typed as any key kind (DSA, X25519, ...), jwt.decode's as signing keys only;
                # the registered certificate is the RSA one this fake issued.
                self._certificate.public_key(),  # type: ignore[arg-type]
                algorithms=["RS256", "PS256"],
                audience=audience,
                issuer=client_id,
                subject=client_id,
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.InvalidSignatureError:
            return "Client assertion failed signature validation."
        except jwt.PyJWTError as exc:
            return f"Client assertion contains an invalid claim or header: {exc}."
        return None

    def _issue(self, tenant: str) -> _Reply:
        access_token = "fake-at-" + secrets.token_urlsafe(32)
        with self._lock:
            expires_in, refresh_in = self._expires_in, self._refresh_in
            self._issued[access_token] = time.time() + expires_in
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": access_token,
        }
        if refresh_in is not None:
            body["refresh_in"] = refresh_in
        return _Reply(200, body, {})

    def _error(self, status: int, error: str, description: str, correlation_id: str) -> _Reply:
        """An error body shaped like Entra's, including the AADSTS code list MSAL surfaces."""
        trace_id = str(uuid.uuid4())
        timestamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        codes = [int(code) for code in _AADSTS_CODE.findall(description)[:1]]
        body: dict[str, Any] = {
            "error": error,
            "error_description": (
                f"{description} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"
            ),
            "error_codes": codes,
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
        }
        if codes:
            body["error_uri"] = f"{self.authority_host}/error?code={codes[0]}"
        return _Reply(status, body, {})


def _missing(parameter: str) -> str:
    return f"AADSTS900144: The request body must contain the following parameter: '{parameter}'."


def _thumbprint_matches(value: object, certificate: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bool:
    """Compare a JOSE x5t/x5t#S256 header (base64url, padding optional) with the cert's digest."""
    if not isinstance(value, str) or not value:
        return False
    try:
        digest = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return False
    return hmac.compare_digest(digest, certificate.fingerprint(algorithm))


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so stop() really ends service; a pooled
    # keep-alive connection must not keep reaching a "stopped" fake.
    protocol_version = "HTTP/1.0"
    timeout = 10
    server: FakeHttpServer

    def do_GET(self) -> None:
        self._send(self.server.fake._handle_get(self.path))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        headers = {name.lower(): value for name, value in self.headers.items()}
        self._send(self.server.fake._handle_token(self.path, body, headers))

    def _send(self, reply: _Reply) -> None:
        payload = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store, no-cache")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fake Entra: " + format, *args)


def main(argv: list[str] | None = None) -> None:
    """Serve a fake Entra for a demo, writing the CA that signs its certificate to DIR/ca.pem."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--client-id", default=CLIENT_ID)
    parser.add_argument("--client-secret", default=CLIENT_SECRET)
    parser.add_argument("--expires-in", type=int, default=3600)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ca = trustme.CA()
    args.cert_dir.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(args.cert_dir / "ca.pem"))
    fake = FakeEntra(
        ca,
        client_id=args.client_id,
        client_secret=args.client_secret,
        expires_in=args.expires_in,
        host=args.host,
        port=args.port,
    )
    with fake:
        print(fake.authority_host, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
