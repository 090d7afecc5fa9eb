"""Talking to the identity provider: MSAL confidential clients built from configuration, and their errors.

One :class:`msal.ConfidentialClientApplication` per tenant per process, built lazily: its constructor does network
discovery, and a replica that finds its token in memory or in the shared blob should never pay for it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, assert_never

import msal
import msal.exceptions
import requests
from azure.core.exceptions import AzureError, ClientAuthenticationError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from graphsync import redaction
from graphsync.config import (
    CertificateCredential,
    Credential,
    FederatedCredential,
    ManagedIdentityCredential,
    SecretCredential,
)
from graphsync.text import first_line

if TYPE_CHECKING:
    import azure.identity

    from graphsync.config import IdentitySettings

TRANSIENT_STATUSES = (500, 502, 503, 504)
# urllib3 would honour a Retry-After of up to 6 hours; a token request or a Graph page must not sleep that long.
RETRY_AFTER_MAX = 120
# What a managed identity's token must be issued for to serve as a federated credential (public cloud; the
# audience of the federated identity credential on the app registration).
TOKEN_EXCHANGE_SCOPE = "api://AzureADTokenExchange/.default"


class TokenError(Exception):
    """The identity provider refused or failed; carries MSAL's error fields, never a credential."""

    def __init__(self, tenant: str, error: str, description: str = "", codes: list[int] | None = None) -> None:
        self.tenant = tenant
        self.error = error
        self.description = first_line(description, limit=1000)
        self.codes = codes or _aadsts_codes(description)
        super().__init__(f"token request for tenant {tenant} failed: {error}: {self.description}".rstrip(": "))

    @classmethod
    def from_result(cls, tenant: str, result: dict[str, Any]) -> TokenError:
        """The error an MSAL result without an access token describes (see also :func:`failure_result`)."""
        return cls(tenant, str(result.get("error")), result.get("error_description") or "", result.get("error_codes"))

    @property
    def aadsts(self) -> str | None:
        """The first AADSTS code (e.g. ``AADSTS7000215``), which is what troubleshooting guides are keyed by."""
        return f"AADSTS{self.codes[0]}" if self.codes else None


def _aadsts_codes(description: str) -> list[int]:
    return [int(code) for code in re.findall(r"AADSTS(\d+)", description)]


def failure_result(exc: Exception) -> dict[str, str]:
    """MSAL's error shape for an exception raised on the way to a token, so every failure is reported alike.

    MSAL raises instead of returning an error for a 5xx that outlived the retries (``MsalServiceError``), a
    transport failure, failed discovery (``ValueError``), and whatever a client-assertion callable raises: a
    federated token file that is gone (``OSError``), a managed identity that gives no token.
    """
    if isinstance(exc, ClientAuthenticationError):
        error = "managed_identity_unavailable"
    elif isinstance(exc, (requests.RequestException, msal.exceptions.MsalServiceError, ValueError)):
        error = "identity_provider_unavailable"
    elif isinstance(exc, OSError):
        error = "credential_unreadable"
    else:
        error = "token_request_failed"
    return {"error": error, "error_description": first_line(str(exc)) or type(exc).__name__}


def retrying_session(
    total: int,
    statuses: tuple[int, ...],
    backoff: float = 0.5,
    retry_class: type[Retry] = Retry,
    retry_after_max: int = RETRY_AFTER_MAX,
) -> requests.Session:
    """A pooled session whose retries (with ``Retry-After`` honoured) come from urllib3, not from our code."""
    retry = retry_class(
        total=total,
        retry_after_max=retry_after_max,
        backoff_factor=backoff,
        backoff_jitter=backoff,
        status_forcelist=statuses,
        allowed_methods=None,  # token POSTs are safe to repeat: a lost response just means one more token
        respect_retry_after_header=True,
        raise_on_status=False,  # hand the last error response to the caller, who reports it
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def client_credential(credential: Credential) -> Any:
    """MSAL's ``client_credential`` for the one credential configured.

    A federated token file is handed over as a callable so MSAL re-reads it on every token request: the kubelet
    rotates that file, and a string read once would eventually expire. A managed identity is a callable for the
    same reason: MSAL calls it only when it sends a token request, and each call asks azure-identity, which keeps
    the managed identity's token cached and fetches a new one when it nears expiry.
    """
    match credential:
        case SecretCredential(client_secret):
            return client_secret.get_secret_value()
        case CertificateCredential():
            return _certificate_credential(credential)
        case FederatedCredential(token_file):
            return {"client_assertion": lambda: token_file.read_text().strip()}
        case ManagedIdentityCredential(client_id):
            return {"client_assertion": _managed_identity_assertion(client_id)}
        case _:
            assert_never(credential)


@functools.cache
def _managed_identity_credential(client_id: str | None) -> azure.identity.ManagedIdentityCredential:
    """One credential per identity per process, shared by every tenant's MSAL client and by rebuilt ones.

    azure-identity picks the endpoint from the environment when the credential is built: IDENTITY_ENDPOINT and
    IDENTITY_HEADER (App Service, Container Apps), MSI_ENDPOINT (Azure ML, Cloud Shell), IMDS (VMs) otherwise.
    """
    # Imported here: azure-identity costs a quarter of a second to import, and only a managed identity needs it
    # (not `graphsync token` answered from the shared cache with a client secret or certificate).
    import azure.identity

    # Short timeouts and one retry: the endpoint is local to the host, and a hung one must not stall a token
    # request for azure-core's default of minutes (a still-valid cached token is served meanwhile).
    return azure.identity.ManagedIdentityCredential(
        client_id=client_id, connection_timeout=3, read_timeout=10, retry_total=1
    )


def _managed_identity_assertion(client_id: str | None) -> Callable[[], str]:
    """A client assertion callable: a managed identity token for Entra's token exchange audience.

    Failures become :class:`ClientAuthenticationError` naming the managed identity, whatever azure-identity raised:
    an unreachable endpoint is a ``ServiceRequestError``, not an authentication error.
    """
    which = "system-assigned managed identity" if client_id is None else f"managed identity {client_id}"
    credential = _managed_identity_credential(client_id)

    def assertion() -> str:
        try:
            token: str = credential.get_token(TOKEN_EXCHANGE_SCOPE).token
        except AzureError as exc:
            reason = first_line(str(exc.message or exc)) or type(exc).__name__
            raise ClientAuthenticationError(f"no token from the {which}: {reason}") from exc
        redaction.register_secret(token)
        return token

    return assertion


def _certificate_credential(certificate: CertificateCredential) -> dict[str, Any]:
    path = certificate.path
    credential: dict[str, Any] = {}
    if certificate.password_file is not None:
        credential["passphrase"] = certificate.password_file.read_text().strip()
    if path.suffix.lower() in (".pfx", ".p12"):
        credential |= {"private_key_pfx_path": str(path), "public_certificate": certificate.send_certificate_chain}
        return credential
    pem = path.read_text()
    certificates = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    # With the certificate present MSAL computes the SHA-256 thumbprint itself and signs with PS256.
    credential |= {"private_key": pem, "public_certificate": "\n".join(certificates)}
    return credential


def build_application(
    settings: IdentitySettings, tenant: str, cache: msal.SerializableTokenCache, http_client: requests.Session
) -> msal.ConfidentialClientApplication:
    """The MSAL client for one tenant; does authority discovery over the network."""
    host = settings.authority_host.rstrip("/")
    well_known = host.removeprefix("https://") in msal.authority.WELL_KNOWN_AUTHORITY_HOSTS
    return msal.ConfidentialClientApplication(
        settings.client_id,
        client_credential=client_credential(settings.credential),
        authority=f"{host}/{tenant}",
        token_cache=cache,
        http_client=http_client,
        instance_discovery=None if well_known else False,
        timeout=10,
    )
