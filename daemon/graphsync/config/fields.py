"""The value types of configuration keys: annotated types, their validators, and the readers of referenced files.

Validators raise ValueError saying what is expected, without quoting the value, because several keys hold secrets
and startup errors end up in logs (only schedule.check_crontab passes on APScheduler's reason, which may quote part
of the expression; a schedule is not secret).
"""

import base64
import binascii
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, HttpUrl, SecretStr, TypeAdapter, ValidationError

from graphsync.config.context import current_load
from graphsync.text import first_line

# identity.managed_identity_client_id's value for the resource's system-assigned identity.
SYSTEM_ASSIGNED = "system"


def os_reason(exc: OSError) -> str:
    """Why a file could not be read, for a message that names the file."""
    return exc.strerror or type(exc).__name__


def _resolve_file(path: Path) -> Path:
    return current_load().resolve(path)


def _readable(path: Path) -> Path:
    """Fail at startup rather than at first use, hours later, when a credential file is unreadable."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {os_reason(exc)}") from None
    return path


def read_text(path: Path) -> str:
    """A secret file's content, stripped; read at load time so a bad file stops startup, not a token request."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {os_reason(exc)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def read_key(path: Path) -> bytes:
    """A cache encryption key file: the base64 of 32 bytes."""
    try:
        key = base64.b64decode(read_text(path), validate=True)
    except binascii.Error:
        raise ValueError(f"{path} does not hold base64 text; expected the base64 of a 32-byte AES-256 key") from None
    if len(key) != 32:
        raise ValueError(f"{path} decodes to {len(key)} bytes; expected the base64 of a 32-byte AES-256 key")
    return key


def _matching(pattern: str, expected: str) -> AfterValidator:
    regex = re.compile(pattern)

    def check(value: str) -> str:
        if regex.fullmatch(value) is None:
            raise ValueError(f"expected {expected}")
        return value

    return AfterValidator(check)


def unique(values: list[str]) -> list[str]:
    """A list validator: a tenant listed twice is a mistake, not a request to run twice."""
    for position, value in enumerate(values):
        if value in values[:position]:
            raise ValueError(f"entries must be unique; entry {position} repeats entry {values.index(value)}")
    return values


def _non_empty_secret(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        raise ValueError("must not be empty")
    return value


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


_HTTP_URL: TypeAdapter[HttpUrl] = TypeAdapter(HttpUrl)
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost"})


def _parse_url(value: str, expected: str) -> HttpUrl:
    try:
        url = _HTTP_URL.validate_python(value)
    except ValidationError:
        raise ValueError(f"expected {expected}") from None
    if url.query is not None or url.fragment is not None:
        raise ValueError(f"expected {expected}, without a query string or fragment")
    return url


def _authority_host(value: str) -> str:
    expected = "an https:// URL with no path, e.g. https://login.microsoftonline.com"
    url = _parse_url(value, expected)
    if url.scheme != "https" or url.path not in (None, "/"):
        raise ValueError(f"expected {expected}")
    return str(url).rstrip("/")


def _account_url(value: str) -> str:
    # Rejecting query strings keeps SAS tokens out of this non-secret field (and out of reprs).
    return str(_parse_url(value, "an http(s):// URL such as https://ACCOUNT.blob.core.windows.net")).rstrip("/")


def _graph_endpoint(value: str) -> str:
    expected = "an https:// URL such as https://graph.microsoft.com (http only for 127.0.0.1 or localhost)"
    url = _parse_url(value, expected)
    if url.scheme != "https" and url.host not in _LOOPBACK_HOSTS:
        raise ValueError(f"expected {expected}")
    return str(url).rstrip("/")


_RESOURCE = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


def _resource(path: str) -> str:
    if _RESOURCE.fullmatch(path) is None or {".", ".."} & set(path.split("/")):
        raise ValueError(
            "expected a collection path under the API version, e.g. users or groups/ID/members: "
            "segments of letters, digits, '.', '_' and '-' separated by '/', with no leading '/', "
            "query string or '..'"
        )
    return path


_GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_DNS_NAME = r"(?=.{4,253}\Z)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"

# Lower-cased: a client id is a GUID, and "system" is a keyword, not a name.
ManagedIdentity = Annotated[
    str,
    AfterValidator(str.lower),
    _matching(
        f"(?:{_GUID})|{SYSTEM_ASSIGNED}",
        f'a user-assigned managed identity\'s client id (a GUID), or "{SYSTEM_ASSIGNED}" for the '
        "system-assigned identity",
    ),
]
# Lower-cased: tenant GUIDs and domain names are case-insensitive, and job tenants are compared to these.
Tenant = Annotated[
    str,
    AfterValidator(str.lower),
    _matching(f"(?:{_GUID})|(?:{_DNS_NAME})", "a tenant GUID or domain name such as contoso.onmicrosoft.com"),
]
ContainerName = Annotated[
    str,
    _matching(
        r"(?=.{3,63}\Z)[a-z0-9]+(?:-[a-z0-9]+)*",
        "a blob container name: 3-63 lowercase letters, digits and single hyphens, "
        "starting and ending with a letter or digit",
    ),
]
PropertyName = Annotated[str, _matching(r"[A-Za-z0-9_@.]+", "property names of letters, digits, '_', '@' and '.'")]
NonEmptyStr = Annotated[str, Field(min_length=1)]
NonEmptySecret = Annotated[SecretStr, AfterValidator(_non_empty_secret)]
# *_file keys: relative paths are anchored at load time (see context.Load.resolve).
ConfigFile = Annotated[Path, AfterValidator(_resolve_file)]
ReadableFile = Annotated[Path, AfterValidator(_resolve_file), AfterValidator(_readable)]
AuthorityHost = Annotated[str, AfterValidator(_authority_host)]
AccountUrl = Annotated[str, AfterValidator(_account_url)]
GraphEndpoint = Annotated[str, AfterValidator(_graph_endpoint)]
ResourcePath = Annotated[str, AfterValidator(_resource)]
JobName = Annotated[str, _matching(r"[a-z0-9-]{1,63}", "1-63 lowercase letters, digits and hyphens")]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)]


def certificate_problem(path: Path, password_file: Path | None) -> str | None:
    """Why Entra ID could not use this certificate file, or ``None``: checked now, not at the first token request.

    Entra ID accepts client assertions signed with RSA keys only; the file must hold the private key and the
    certificate (PEM), or be a PKCS#12 bundle (.pfx / .p12).
    """
    # cryptography is imported here, for a certificate credential only: a secret's configuration loads without it.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs12

    password = password_file.read_bytes().strip() if password_file is not None else None
    data = path.read_bytes()
    try:
        if path.suffix.lower() in (".pfx", ".p12"):
            key, certificate, _ = pkcs12.load_key_and_certificates(data, password)
        else:
            key = serialization.load_pem_private_key(data, password)
            certificate = x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as exc:
        reason = first_line(str(exc), limit=1000) or type(exc).__name__
        return (
            f"cannot load a private key and certificate from {path} ({reason}); expected PEM with both, "
            "or .pfx/.p12 (with identity.certificate_password_file if encrypted)"
        )
    if certificate is None:
        return f"{path} holds no certificate"
    if not isinstance(key, rsa.RSAPrivateKey):
        return f"{path} does not hold an RSA private key; Entra ID accepts RSA certificates only"
    return None
