"""graphsync configuration: one TOML file plus GRAPHSYNC_* environment variables.

pydantic-settings reads and merges the sources and pydantic validates the result. What this
module adds is the error report: every problem becomes one line naming the key in dotted form
(``jobs[1].every``), where its value came from (the TOML file or the environment variable to
edit) and what is expected, so that an operator can fix a daemon that refuses to start without
reading a traceback. Values are never echoed in those lines, because several keys hold secrets
and startup errors end up in logs.
"""

import base64
import binascii
import difflib
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeAlias, get_args, get_origin

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    PositiveFloat,
    PrivateAttr,
    SecretStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from graphsync.schedule import check_crontab, check_interval, interval_seconds

DEFAULT_CONFIG_PATH = Path("/etc/graphsync/config.toml")
DEFAULT_OUTPUT_DIRECTORY = Path("/var/lib/graphsync")

ENV_PREFIX = "GRAPHSYNC_"
_ENV_DELIMITER = "__"
# Names the config file itself (see find_config_file), so it is not a setting.
_CONFIG_VARIABLE = "GRAPHSYNC_CONFIG"
# systemd's LoadCredential= puts credential files here and exports the directory.
_CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"

# Variables Azure workload identity injects into a pod, by the [identity] key they fill.
_WORKLOAD_VARIABLES = {
    "client_id": "AZURE_CLIENT_ID",
    "tenants": "AZURE_TENANT_ID",
    "authority_host": "AZURE_AUTHORITY_HOST",
    "federated_token_file": "AZURE_FEDERATED_TOKEN_FILE",
}
_CREDENTIAL_KEYS = (
    "client_secret",
    "client_secret_file",
    "certificate_file",
    "federated_token_file",
    "managed_identity_client_id",
)
# identity.managed_identity_client_id's value for the resource's system-assigned identity.
SYSTEM_ASSIGNED = "system"

# Custom pydantic error types. A model validator can only fail as a whole, at the model's
# location; these carry the keys involved so the report can still name each key and its origin.
_CHOICE_ERROR = "graphsync_choice"
_KEY_ERRORS = "graphsync_key_errors"

_Loc: TypeAlias = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one readable line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class _Load:
    """The inputs of the load_settings call in progress.

    pydantic-settings asks ``Settings.settings_customise_sources`` for its sources through a
    classmethod with a fixed signature, and BaseSettings passes no validation context to
    validators, so this travels in a ContextVar: it lets the sources and the path-resolving
    validators see the environ and config file of this call, and only of this call.
    """

    config_file: Path | None
    environ: Mapping[str, str]
    sources: tuple[PydanticBaseSettingsSource, ...] = ()

    def resolve(self, path: Path) -> Path:
        """Anchor a relative *_file path where a deployment keeps such files.

        systemd's LoadCredential= exposes credentials in $CREDENTIALS_DIRECTORY under the names
        the config uses; otherwise paths are relative to the config file, so a config and its
        secrets can be moved together; with no file (environment-only), to the working directory.
        """
        if path.is_absolute():
            return path
        credentials = self.environ.get(_CREDENTIALS_VARIABLE)
        if credentials:
            base = Path(credentials)
        elif self.config_file is not None:
            base = self.config_file.parent
        else:
            base = Path.cwd()
        return (base / path).absolute()


_LOAD: ContextVar[_Load | None] = ContextVar("graphsync_config_load", default=None)


def _current_load() -> _Load:
    """The running load_settings call; for a Settings() built directly, the process environment and no file."""
    return _LOAD.get() or _Load(None, os.environ)


# --- field validators -------------------------------------------------------------------------
# They raise ValueError saying what is expected, without quoting the value (only schedule.check_crontab passes
# on APScheduler's reason, which may quote part of the expression; a schedule is not secret).


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _resolve_file(path: Path) -> Path:
    return _current_load().resolve(path)


def _readable(path: Path) -> Path:
    """Fail at startup rather than at first use, hours later, when a credential file is unreadable."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {_os_reason(exc)}") from None
    return path


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {_os_reason(exc)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def _read_key(path: Path) -> bytes:
    try:
        key = base64.b64decode(_read_text(path), validate=True)
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


def _unique(values: list[str]) -> list[str]:
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
_ManagedIdentity = Annotated[
    str,
    AfterValidator(str.lower),
    _matching(
        f"(?:{_GUID})|{SYSTEM_ASSIGNED}",
        f'a user-assigned managed identity\'s client id (a GUID), or "{SYSTEM_ASSIGNED}" for the '
        "system-assigned identity",
    ),
]
# Lower-cased: tenant GUIDs and domain names are case-insensitive, and job tenants are compared to these.
_Tenant = Annotated[
    str,
    AfterValidator(str.lower),
    _matching(f"(?:{_GUID})|(?:{_DNS_NAME})", "a tenant GUID or domain name such as contoso.onmicrosoft.com"),
]
_ContainerName = Annotated[
    str,
    _matching(
        r"(?=.{3,63}\Z)[a-z0-9]+(?:-[a-z0-9]+)*",
        "a blob container name: 3-63 lowercase letters, digits and single hyphens, "
        "starting and ending with a letter or digit",
    ),
]
_PropertyName = Annotated[str, _matching(r"[A-Za-z0-9_@.]+", "property names of letters, digits, '_', '@' and '.'")]
_NonEmptyStr = Annotated[str, Field(min_length=1)]
_Secret = Annotated[SecretStr, AfterValidator(_non_empty_secret)]
# *_file keys: relative paths are anchored at load time (see _Load.resolve).
_ConfigFile = Annotated[Path, AfterValidator(_resolve_file)]
_ReadableFile = Annotated[Path, AfterValidator(_resolve_file), AfterValidator(_readable)]


# --- model-level checks -------------------------------------------------------------------------


def _require_one(model: BaseModel, keys: tuple[str, ...], what: str, *, required: bool = True) -> None:
    """Fail unless exactly one of ``keys`` is set (or none, when not ``required``)."""
    found = tuple(key for key in keys if getattr(model, key) is not None)
    if len(found) > 1 or (required and not found):
        quantity = "exactly one" if required else "at most one"
        raise PydanticCustomError(
            _CHOICE_ERROR,
            "expected {quantity} {what} of {keys}",
            {"quantity": quantity, "what": what, "keys": keys, "found": found},
        )


def _key_errors(problems: list[tuple[_Loc, str]]) -> PydanticCustomError:
    """One error for problems found by a model validator, each located under the model."""
    summary = "; ".join(f"{_dotted(loc)}: {message}" for loc, message in problems)
    return PydanticCustomError(_KEY_ERRORS, "{summary}", {"summary": summary, "problems": tuple(problems)})


def _certificate_problem(path: Path, password_file: Path | None) -> str | None:
    """Why Entra ID could not use this certificate file, or ``None``: checked now, not at the first token request.

    Entra ID accepts client assertions signed with RSA keys only; the file must hold the private key and the
    certificate (PEM), or be a PKCS#12 bundle (.pfx / .p12).
    """
    password = password_file.read_bytes().strip() if password_file is not None else None
    data = path.read_bytes()
    try:
        if path.suffix.lower() in (".pfx", ".p12"):
            key, certificate, _ = pkcs12.load_key_and_certificates(data, password)
        else:
            key = serialization.load_pem_private_key(data, password)
            certificate = x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return (
            f"cannot load a private key and certificate from {path} ({reason}); expected PEM with both, "
            "or .pfx/.p12 (with identity.certificate_password_file if encrypted)"
        )
    if certificate is None:
        return f"{path} holds no certificate"
    if not isinstance(key, rsa.RSAPrivateKey):
        return f"{path} does not hold an RSA private key; Entra ID accepts RSA certificates only"
    return None


# --- sections ------------------------------------------------------------------------------------


class IdentitySettings(BaseModel):
    """[identity]: the Entra ID app registration graphsync signs in as (app-only, via MSAL)."""

    model_config = ConfigDict(extra="forbid")

    client_id: _NonEmptyStr
    tenants: Annotated[list[_Tenant], Field(min_length=1), AfterValidator(_unique)]
    authority_host: Annotated[str, AfterValidator(_authority_host)] = "https://login.microsoftonline.com"
    scopes: Annotated[list[_NonEmptyStr], Field(min_length=1)] = ["https://graph.microsoft.com/.default"]
    client_secret: _Secret | None = None
    client_secret_file: _ConfigFile | None = None
    certificate_file: _ReadableFile | None = None
    certificate_password_file: _ReadableFile | None = None
    send_certificate_chain: bool = False
    # Checked here but read on every use: the platform rotates the token in place.
    federated_token_file: _ReadableFile | None = None
    # A managed identity the app registration trusts as a federated credential; its token is the client assertion.
    managed_identity_client_id: _ManagedIdentity | None = None

    @model_validator(mode="after")
    def _check_credential(self) -> Self:
        """One credential, certificate options only with a certificate, and the secret file read now.

        Reading at load turns an unreadable or empty secret file into a startup error instead of a
        failed token request later.
        """
        _require_one(self, _CREDENTIAL_KEYS, "credential")
        problems: list[tuple[_Loc, str]] = []
        if self.certificate_file is None:
            if self.certificate_password_file is not None:
                problems.append((("certificate_password_file",), "is only used with identity.certificate_file"))
            if self.send_certificate_chain:
                problems.append((("send_certificate_chain",), "is only used with identity.certificate_file"))
        if self.certificate_file is not None and (
            problem := _certificate_problem(self.certificate_file, self.certificate_password_file)
        ):
            problems.append((("certificate_file",), problem))
        if self.client_secret_file is not None:
            try:
                self.client_secret = SecretStr(_read_text(self.client_secret_file))
            except ValueError as exc:
                problems.append((("client_secret_file",), str(exc)))
        if problems:
            raise _key_errors(problems)
        return self

    @property
    def credential_kind(self) -> Literal["secret", "certificate", "federated", "managed_identity"]:
        """Which credential MSAL gets; client_secret_file has been read into client_secret by now."""
        if self.client_secret is not None:
            return "secret"
        if self.certificate_file is not None:
            return "certificate"
        if self.managed_identity_client_id is not None:
            return "managed_identity"
        return "federated"


class StorageSettings(BaseModel):
    """[storage]: the blob container holding the shared MSAL token cache."""

    model_config = ConfigDict(extra="forbid")

    connection_string: _Secret | None = None
    account_url: Annotated[str, AfterValidator(_account_url)] | None = None
    container: _ContainerName = "graphsync"
    encryption_key_file: _ConfigFile | None = None
    previous_encryption_key_files: list[_ConfigFile] = []
    timeout_seconds: PositiveFloat = 5.0
    # Private, so it can be neither configured nor serialized, and stays out of repr().
    _encryption_keys: list[bytes] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_account_and_keys(self) -> Self:
        """One storage account; key files read and checked now, so a bad key stops startup, not a cache read."""
        _require_one(self, ("connection_string", "account_url"), "storage account")
        key_files: list[tuple[_Loc, Path]] = [
            (("previous_encryption_key_files", index), path)
            for index, path in enumerate(self.previous_encryption_key_files)
        ]
        problems: list[tuple[_Loc, str]] = []
        if self.encryption_key_file is not None:
            key_files.insert(0, (("encryption_key_file",), self.encryption_key_file))
        elif key_files:
            problems.append(
                (("previous_encryption_key_files",), "needs storage.encryption_key_file, the key to write with")
            )
        keys: list[bytes] = []
        for loc, path in key_files:
            try:
                keys.append(_read_key(path))
            except ValueError as exc:
                problems.append((loc, str(exc)))
        if problems:
            raise _key_errors(problems)
        self._encryption_keys = keys
        return self

    @property
    def encryption_keys(self) -> list[bytes]:
        """AES-256 keys for the cache blob: the current key first, then older ones still accepted for reading.

        Empty when no key file is configured.
        """
        return list(self._encryption_keys)


class CacheSettings(BaseModel):
    """[cache]: how replicas share one token cache blob."""

    model_config = ConfigDict(extra="forbid")

    prefix: _NonEmptyStr = "token-cache"
    # Azure accepts finite blob leases of 15 to 60 seconds.
    lease_seconds: Annotated[int, Field(ge=15, le=60)] = 15
    lock_wait_seconds: PositiveFloat = 20.0


class GraphSettings(BaseModel):
    """[graph]: the Microsoft Graph endpoint and how patiently to call it."""

    model_config = ConfigDict(extra="forbid")

    endpoint: Annotated[str, AfterValidator(_graph_endpoint)] = "https://graph.microsoft.com"
    api_version: Literal["v1.0", "beta"] = "v1.0"
    timeout_seconds: PositiveFloat = 30.0
    max_retries: Annotated[int, Field(ge=0)] = 5


class OutputSettings(BaseModel):
    """[output]: where exports go, a local directory or a container in the [storage] account."""

    model_config = ConfigDict(extra="forbid")

    directory: Path | None = None
    container: _ContainerName | None = None

    @model_validator(mode="after")
    def _one_destination(self) -> Self:
        _require_one(self, ("directory", "container"), "output destination", required=False)
        if self.container is None and self.directory is None:
            self.directory = DEFAULT_OUTPUT_DIRECTORY
        return self


class MetricsSettings(BaseModel):
    """[metrics]: the Prometheus endpoint; no port means no metrics server."""

    model_config = ConfigDict(extra="forbid")

    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    host: _NonEmptyStr = "127.0.0.1"


class JobSettings(BaseModel):
    """[[jobs]]: one Graph collection exported on a schedule."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, _matching(r"[a-z0-9-]{1,63}", "1-63 lowercase letters, digits and hyphens")]
    resource: Annotated[str, AfterValidator(_resource)]
    delta: bool = False
    select: Annotated[list[_PropertyName], Field(min_length=1)] | None = None
    every: Annotated[str, AfterValidator(check_interval)] | None = None
    cron: Annotated[str, AfterValidator(check_crontab)] | None = None
    tenants: Annotated[list[_Tenant], AfterValidator(_unique)] = []

    @model_validator(mode="after")
    def _one_schedule(self) -> Self:
        _require_one(self, ("every", "cron"), "schedule")
        return self

    @property
    def interval_seconds(self) -> int | None:
        """``every`` in seconds; None for a cron job."""
        return None if self.every is None else interval_seconds(self.every)


LogLevel: TypeAlias = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class Settings(BaseSettings):
    """The whole configuration; build it with load_settings() to get readable errors."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=_ENV_DELIMITER, extra="forbid")

    log_level: Annotated[LogLevel, BeforeValidator(_upper)] = "INFO"
    # Validated from an empty table when absent, so a missing section reports each missing key by name.
    identity: IdentitySettings = Field(default_factory=dict, validate_default=True)
    storage: StorageSettings = Field(default_factory=dict, validate_default=True)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    graph: GraphSettings = Field(default_factory=GraphSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    jobs: list[JobSettings] = []

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: init kwargs > GRAPHSYNC_* environment > TOML file > Azure workload identity variables.

        load_settings supplies the environment, file and workload-identity sources for its
        call; a Settings() built directly reads only its kwargs and os.environ.
        """
        return (init_settings, *(_current_load().sources or (env_settings,)))

    @model_validator(mode="after")
    def _check_jobs(self) -> Self:
        problems: list[tuple[_Loc, str]] = []
        first_index: dict[str, int] = {}
        for index, job in enumerate(self.jobs):
            if job.name in first_index:
                problems.append(
                    (("jobs", index, "name"), f"duplicate job name; jobs[{first_index[job.name]}] has the same name")
                )
            first_index.setdefault(job.name, index)
            for position, tenant in enumerate(job.tenants):
                if tenant not in self.identity.tenants:
                    problems.append((("jobs", index, "tenants", position), "is not one of identity.tenants"))
        if problems:
            raise _key_errors(problems)
        return self

    def job_tenants(self, job: JobSettings) -> list[str]:
        """The tenants a job runs for: its own subset, or every configured tenant when it names none."""
        return list(job.tenants or self.identity.tenants)


# --- sources -------------------------------------------------------------------------------------


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _nests(annotation: Any) -> bool:
    """Whether pydantic-settings puts GRAPHSYNC_<FIELD>__* variables into this field (not so for a scalar)."""
    return _is_model(annotation) or get_origin(annotation) is list


def _variable_name(path: Sequence[str]) -> str:
    return ENV_PREFIX + _ENV_DELIMITER.join(path).upper()


class _EnvironSource(EnvSettingsSource):
    """GRAPHSYNC_* variables from an explicit mapping, reporting unknown names and bad JSON by variable.

    The stock source reads os.environ, silently drops a variable whose first segment names no
    field (GRAPHSYNC_IDENTTY__CLIENT_ID, which would look like a missing value instead of a
    typo), and reports bad JSON only per section. Unknown variables are passed on under their
    name after the prefix, so ``extra="forbid"`` reports them like unknown keys in the file.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)
        fields = settings_cls.model_fields
        #: Key path each variable sets -> the variable's name as given.
        self.variables: dict[tuple[str, ...], str] = {}
        for name in environ:
            if not name.upper().startswith(ENV_PREFIX) or name.upper() == _CONFIG_VARIABLE:
                continue
            rest = name[len(ENV_PREFIX) :].lower()
            path = tuple(rest.split(_ENV_DELIMITER))
            field = fields.get(path[0])
            if field is None or (len(path) > 1 and not _nests(field.annotation)):
                path = (rest,)
            self.variables[path] = name
        self._paths = {name.lower(): path for path, name in self.variables.items()}

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        for path, name in self.variables.items():
            if path[0] not in self.settings_cls.model_fields:
                data[path[0]] = self._environ[name]
        return data

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError as exc:  # GRAPHSYNC_<FIELD> itself is not JSON (nested variables are named below)
            raise self._invalid_json((field_name,), exc) from None

    def explode_env_vars(self, field_name: str, field: FieldInfo, env_vars: Mapping[str, str | None]) -> dict[str, Any]:
        try:
            return super().explode_env_vars(field_name, field, env_vars)
        except ValueError:
            for name, value in env_vars.items():
                try:
                    super().explode_env_vars(field_name, field, {name: value})
                except ValueError as exc:
                    raise self._invalid_json(self._paths[name], exc) from None
            raise

    def _invalid_json(self, path: tuple[str, ...], exc: ValueError) -> ConfigError:
        return ConfigError(
            [
                f"{_dotted(path)} (from env {self.variables[path]}): not valid JSON ({exc}); "
                'lists and tables set from the environment are JSON, e.g. ["a", "b"]'
            ]
        )


class _WorkloadIdentitySource(PydanticBaseSettingsSource):
    """Fill [identity] from the AZURE_* variables workload identity injects into a pod.

    Lowest precedence, key by key: a value from the file or GRAPHSYNC_* always wins, and the
    federated token file is only used when no credential is configured at all. Nothing is filled
    when a managed identity is the credential: there AZURE_CLIENT_ID conventionally names the
    managed identity (for DefaultAzureCredential), not the app registration graphsync signs in as.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ
        #: Key path filled -> the variable it came from.
        self.filled: dict[tuple[str, ...], str] = {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Required by the base class; this source fills keys inside [identity] in __call__ instead.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        identity = self.current_state.get("identity", {})
        if not isinstance(identity, Mapping) or "managed_identity_client_id" in identity:
            return {}
        has_credential = any(key in identity for key in _CREDENTIAL_KEYS)
        values: dict[str, Any] = {}
        for key, variable in _WORKLOAD_VARIABLES.items():
            value = self._environ.get(variable)
            if not value or key in identity or (key == "federated_token_file" and has_credential):
                continue
            values[key] = [value] if key == "tenants" else value
            self.filled[("identity", key)] = variable
        return {"identity": values} if values else {}


# --- error report --------------------------------------------------------------------------------


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model holding the keys under ``loc`` (list indexes step into the list's item model)."""
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if get_origin(annotation) is list:
            (annotation,) = get_args(annotation)
        if not _is_model(annotation):
            return None
        model = annotation
    return model


def _settings_variables(model: type[BaseModel] = Settings, path: tuple[str, ...] = ()) -> list[str]:
    """Every GRAPHSYNC_* variable that sets a key, for "did you mean" suggestions."""
    names: list[str] = []
    for name, field in model.model_fields.items():
        if _is_model(field.annotation):
            names += _settings_variables(field.annotation, (*path, name))
        else:
            names.append(_variable_name((*path, name)))
    return names


def _closest(word: str, candidates: Sequence[str]) -> str | None:
    return next(iter(difflib.get_close_matches(word, candidates, n=1)), None)


@dataclass(frozen=True)
class _Origins:
    """Where each key's value came from, so a problem points at the file or variable to edit."""

    config_file: Path | None
    file_data: Mapping[str, Any]
    variables: Mapping[tuple[str, ...], str]
    workload: Mapping[tuple[str, ...], str]

    def of(self, loc: _Loc) -> str:
        """Describe the source of the value at ``loc``, in source precedence order."""
        variable = self._covering(self.variables, loc)
        if variable is not None:
            return f"from env {variable}"
        below = [name for path, name in self.variables.items() if path[: len(loc)] == loc]
        if below:
            return "from env " + ", ".join(below)
        if self._in_file(loc):
            return f"from {self.config_file}"
        variable = self._covering(self.workload, loc)
        if variable is not None:
            return f"from env {variable}"
        return "not set"

    def line(self, loc: _Loc, message: str) -> str:
        return f"{_dotted(loc)} ({self.of(loc)}): {message}"

    def where_to_set(self, loc: _Loc) -> str:
        """Where a missing key can be given: the variable holding its enclosing JSON, or the file and its variable."""
        variable = self._covering(self.variables, loc)
        if variable is not None:
            return f"add it to {variable}"
        hint = f"set {_dotted(loc)} in {self._places(loc, '')}"
        if loc[:-1] == ("identity",) and loc[-1] in _WORKLOAD_VARIABLES:
            hint += f" (or {_WORKLOAD_VARIABLES[str(loc[-1])]} for Azure workload identity)"
        return hint

    def _places(self, loc: _Loc, variable_suffix: str) -> str:
        """The config file, and the variable for ``loc`` unless it lies inside a list (no variable reaches that)."""
        places = [str(self.config_file) if self.config_file is not None else "the config file"]
        if all(isinstance(part, str) for part in loc):
            places.append(_variable_name([str(part) for part in loc]) + variable_suffix)
        return " or ".join(places)

    def describe(self, error: ErrorDetails) -> list[str]:
        loc = tuple(error["loc"])
        ctx = error.get("ctx", {})
        kind = error["type"]
        if kind == _KEY_ERRORS:
            return [self.line((*loc, *inner), message) for inner, message in ctx["problems"]]
        if kind == _CHOICE_ERROR:
            return [self._choice(loc, ctx["quantity"], ctx["what"], ctx["keys"], ctx["found"])]
        if kind == "missing":
            return [f"{_dotted(loc)} (not set): required; {self.where_to_set(loc)}"]
        if kind == "extra_forbidden":
            return [self.line(loc, "unknown key" + self._suggestion(loc))]
        if kind == "value_error":
            return [self.line(loc, str(ctx["error"]))]
        # pydantic's own messages say what is expected and leave the input out.
        return [self.line(loc, error["msg"])]

    def _choice(self, loc: _Loc, quantity: str, what: str, keys: tuple[str, ...], found: tuple[str, ...]) -> str:
        options = ", ".join(_dotted((*loc, key)) for key in keys)
        if found:
            conflicting = " and ".join(f"{_dotted((*loc, key))} ({self.of((*loc, key))})" for key in found)
            return f"{_dotted(loc)}: conflicting keys {conflicting}; set {quantity} {what}: {options}"
        return f"{_dotted(loc)} (not set): no {what}; set one of {options} in {self._places(loc, '__<KEY>')}"

    def _suggestion(self, loc: _Loc) -> str:
        variable = self.variables.get(tuple(str(part) for part in loc))
        if variable is not None:
            known = [name[len(ENV_PREFIX) :] for name in _settings_variables()]
            match = _closest(variable[len(ENV_PREFIX) :].upper(), known)
            return f"; did you mean {ENV_PREFIX}{match}?" if match else ""
        model = _model_at(loc[:-1])
        match = _closest(str(loc[-1]), list(model.model_fields)) if model is not None else None
        return f"; did you mean {_dotted((*loc[:-1], match))}?" if match else ""

    @staticmethod
    def _covering(paths: Mapping[tuple[str, ...], str], loc: _Loc) -> str | None:
        """The variable setting ``loc`` or a table or list containing it (the most specific one)."""
        covering = [path for path in paths if loc[: len(path)] == path]
        return paths[max(covering, key=len)] if covering else None

    def _in_file(self, loc: _Loc) -> bool:
        node: Any = self.file_data
        for part in loc:
            if isinstance(node, dict):
                if part not in node:
                    return False
            elif isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    return False
            else:  # the problem lies inside a value the file does give
                return True
            node = node[part]
        return bool(loc) and self.config_file is not None


# --- public entry points ---------------------------------------------------------------------------


def find_config_file(cli_path: str | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """Pick the config file: --config, else $GRAPHSYNC_CONFIG, else DEFAULT_CONFIG_PATH if present.

    None means environment-only configuration. A file named explicitly must exist: silently
    falling back to defaults would hide a typo in a path.
    """
    if cli_path is not None:
        path, origin = Path(cli_path), "--config"
    elif environ.get(_CONFIG_VARIABLE):
        path, origin = Path(environ[_CONFIG_VARIABLE]), _CONFIG_VARIABLE
    else:
        return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None
    if not path.is_file():
        raise ConfigError([f"config file {path} (from {origin}): does not exist or is not a regular file"])
    return path


def _read_config_file(config_file: Path | None) -> TomlConfigSettingsSource:
    """Parse the file up front: TomlConfigSettingsSource skips a missing file silently."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError([f"config file {config_file}: does not exist or is not a regular file"])
    try:
        return TomlConfigSettingsSource(Settings, toml_file=config_file)
    except OSError as exc:
        problem = f"config file {config_file}: cannot read it: {_os_reason(exc)}"
    except tomllib.TOMLDecodeError as exc:  # its message gives line and column, not document text
        problem = f"config file {config_file}: invalid TOML: {exc}"
    except UnicodeDecodeError:
        problem = f"config file {config_file}: not UTF-8 text"
    raise ConfigError([problem])


def load_settings(config_file: Path | None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Load and check the whole configuration, reading every referenced secret and key file.

    Raises ConfigError, one line per problem, and nothing else: the caller prints it and exits.
    The error is raised outside any ``except`` block so it carries no chained pydantic
    exception, whose text would include the offending (possibly secret) input values.
    """
    config_file = config_file.absolute() if config_file is not None else None
    file_source = _read_config_file(config_file)
    env_source = _EnvironSource(Settings, environ)
    workload_source = _WorkloadIdentitySource(Settings, environ)
    token = _LOAD.set(_Load(config_file, environ, (env_source, file_source, workload_source)))
    try:
        return Settings()
    except ValidationError as exc:
        origins = _Origins(config_file, file_source.toml_data, env_source.variables, workload_source.filled)
        problems = [line for error in exc.errors() for line in origins.describe(error)]
    except SettingsError as exc:  # pydantic-settings' own failures name a section, never a value
        problems = [f"environment: {exc}"]
    finally:
        _LOAD.reset(token)
    raise ConfigError(problems)
