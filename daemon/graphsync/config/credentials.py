"""The one credential graphsync signs in with, as a type rather than a set of optional keys.

[identity] offers five keys for four kinds of credential and exactly one may be set. Code that uses the credential
matches on its type, and each type carries only what its kind needs, so nothing reads an unset key by mistake.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from pydantic import SecretStr


@dataclass(frozen=True)
class SecretCredential:
    """identity.client_secret, or what identity.client_secret_file held when the configuration was loaded."""

    client_secret: SecretStr


@dataclass(frozen=True)
class CertificateCredential:
    """identity.certificate_file: PEM with the private key and certificate, or a .pfx/.p12 bundle."""

    path: Path
    password_file: Path | None
    send_certificate_chain: bool


@dataclass(frozen=True)
class FederatedCredential:
    """identity.federated_token_file: read on every token request, because the platform rotates it in place."""

    token_file: Path


@dataclass(frozen=True)
class ManagedIdentityCredential:
    """identity.managed_identity_client_id: a managed identity's token is the client assertion.

    ``client_id`` is None for the resource's system-assigned identity.
    """

    client_id: str | None


Credential: TypeAlias = SecretCredential | CertificateCredential | FederatedCredential | ManagedIdentityCredential
