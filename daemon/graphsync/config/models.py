"""The configuration's sections as pydantic models, and ``Settings``, the whole of it.

Each model checks what spans its keys (one credential, one storage account, one schedule) and reads the files its
keys name while loading, so that a bad secret or key file stops startup instead of failing a token request hours
later.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PrivateAttr,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from graphsync.config.context import current_load
from graphsync.config.credentials import (
    CertificateCredential,
    Credential,
    FederatedCredential,
    ManagedIdentityCredential,
    SecretCredential,
)
from graphsync.config.errors import Loc, key_errors, require_one
from graphsync.config.fields import (
    SYSTEM_ASSIGNED,
    AccountUrl,
    AuthorityHost,
    ConfigFile,
    ContainerName,
    GraphEndpoint,
    JobName,
    LogLevel,
    ManagedIdentity,
    NonEmptySecret,
    NonEmptyStr,
    PropertyName,
    ReadableFile,
    ResourcePath,
    Tenant,
    certificate_problem,
    read_key,
    read_text,
    unique,
)
from graphsync.config.jobkinds import LOG_CURSORS, SINGLETONS, cursor_problem, expand_problem
from graphsync.config.notifications import NotificationSettings
from graphsync.config.presets import expand_presets
from graphsync.limits import MAX_CONCURRENCY
from graphsync.schedule import check_crontab, check_interval, interval_seconds

DEFAULT_OUTPUT_DIRECTORY = Path("/var/lib/graphsync")

# Settings read GRAPHSYNC_<SECTION>__<KEY> variables.
ENV_PREFIX = "GRAPHSYNC_"
ENV_DELIMITER = "__"

# reconcile_every's value that turns reconciliation off.
RECONCILE_OFF = "0"

# The [identity] keys that each name a credential; exactly one must be set.
CREDENTIAL_KEYS = (
    "client_secret",
    "client_secret_file",
    "certificate_file",
    "federated_token_file",
    "managed_identity_client_id",
)


class IdentitySettings(BaseModel):
    """[identity]: the Entra ID app registration graphsync signs in as (app-only, via MSAL)."""

    model_config = ConfigDict(extra="forbid")

    client_id: NonEmptyStr
    tenants: Annotated[list[Tenant], Field(min_length=1), AfterValidator(unique)]
    authority_host: AuthorityHost = "https://login.microsoftonline.com"
    scopes: Annotated[list[NonEmptyStr], Field(min_length=1)] = ["https://graph.microsoft.com/.default"]
    client_secret: NonEmptySecret | None = None
    client_secret_file: ConfigFile | None = None
    certificate_file: ReadableFile | None = None
    certificate_password_file: ReadableFile | None = None
    send_certificate_chain: bool = False
    # Checked here but read on every use: the platform rotates the token in place.
    federated_token_file: ReadableFile | None = None
    # A managed identity the app registration trusts as a federated credential; its token is the client assertion.
    managed_identity_client_id: ManagedIdentity | None = None
    # Private, so it can be neither configured nor serialized: derived from the keys above by _check_credential.
    _credential: Credential = PrivateAttr()

    @model_validator(mode="after")
    def _check_credential(self) -> Self:
        """One credential, certificate options only with a certificate, and the secret file read now.

        Reading at load turns an unreadable or empty secret file into a startup error instead of a
        failed token request later.
        """
        require_one(self, CREDENTIAL_KEYS, "credential")
        problems: list[tuple[Loc, str]] = []
        if self.certificate_file is None:
            if self.certificate_password_file is not None:
                problems.append((("certificate_password_file",), "is only used with identity.certificate_file"))
            if self.send_certificate_chain:
                problems.append((("send_certificate_chain",), "is only used with identity.certificate_file"))
        if self.certificate_file is not None and (
            problem := certificate_problem(self.certificate_file, self.certificate_password_file)
        ):
            problems.append((("certificate_file",), problem))
        if self.client_secret_file is not None:
            try:
                self.client_secret = SecretStr(read_text(self.client_secret_file))
            except ValueError as exc:
                problems.append((("client_secret_file",), str(exc)))
        if problems:
            raise key_errors(problems)
        self._credential = self._configured_credential()
        return self

    @property
    def credential(self) -> Credential:
        """The one credential configured, to match on by type."""
        return self._credential

    def _configured_credential(self) -> Credential:
        """The credential require_one found; client_secret_file has been read into client_secret by now."""
        if self.client_secret is not None:
            return SecretCredential(self.client_secret)
        if self.certificate_file is not None:
            return CertificateCredential(
                self.certificate_file, self.certificate_password_file, self.send_certificate_chain
            )
        if self.federated_token_file is not None:
            return FederatedCredential(self.federated_token_file)
        if self.managed_identity_client_id is not None:
            client_id = self.managed_identity_client_id
            return ManagedIdentityCredential(None if client_id == SYSTEM_ASSIGNED else client_id)
        raise AssertionError("require_one lets exactly one credential key through")


class StorageSettings(BaseModel):
    """[storage]: the blob container holding the shared MSAL token cache."""

    model_config = ConfigDict(extra="forbid")

    connection_string: NonEmptySecret | None = None
    account_url: AccountUrl | None = None
    container: ContainerName = "graphsync"
    encryption_key_file: ConfigFile | None = None
    previous_encryption_key_files: list[ConfigFile] = []
    timeout_seconds: PositiveFloat = 5.0
    # Private, so it can be neither configured nor serialized, and stays out of repr().
    _encryption_keys: list[bytes] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_account_and_keys(self) -> Self:
        """One storage account; key files read and checked now, so a bad key stops startup, not a cache read."""
        require_one(self, ("connection_string", "account_url"), "storage account")
        key_files: list[tuple[Loc, Path]] = [
            (("previous_encryption_key_files", index), path)
            for index, path in enumerate(self.previous_encryption_key_files)
        ]
        problems: list[tuple[Loc, str]] = []
        if self.encryption_key_file is not None:
            key_files.insert(0, (("encryption_key_file",), self.encryption_key_file))
        elif key_files:
            problems.append(
                (("previous_encryption_key_files",), "needs storage.encryption_key_file, the key to write with")
            )
        keys: list[bytes] = []
        for loc, path in key_files:
            try:
                keys.append(read_key(path))
            except ValueError as exc:
                problems.append((loc, str(exc)))
        if problems:
            raise key_errors(problems)
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

    prefix: NonEmptyStr = "token-cache"
    # Azure accepts finite blob leases of 15 to 60 seconds.
    lease_seconds: Annotated[int, Field(ge=15, le=60)] = 15
    lock_wait_seconds: PositiveFloat = 20.0


class GraphSettings(BaseModel):
    """[graph]: the Microsoft Graph endpoint and how patiently to call it."""

    model_config = ConfigDict(extra="forbid")

    endpoint: GraphEndpoint = "https://graph.microsoft.com"
    api_version: Literal["v1.0", "beta"] = "v1.0"
    timeout_seconds: PositiveFloat = 30.0
    max_retries: Annotated[int, Field(ge=0)] = 5


def default_work_directory(environ: Mapping[str, str]) -> Path:
    """Where working stores go unless ``[output] work_directory`` says otherwise.

    ``$STATE_DIRECTORY/work`` under systemd (``StateDirectory=``; the image sets ``STATE_DIRECTORY`` too, so it is
    ``/var/lib/graphsync/work`` there), else the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``).
    """
    if state := environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0]) / "work"  # systemd lists several state directories with ':'
    cache = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(cache) / "graphsync" / "work"


class OutputSettings(BaseModel):
    """[output]: where exports go, a local directory or a container in the [storage] account, and where this
    host keeps each job's working store between runs."""

    model_config = ConfigDict(extra="forbid")

    directory: Path | None = None
    container: ContainerName | None = None
    # A factory, not a constant: it reads the environment of the load_settings call in progress.
    work_directory: Path = Field(default_factory=lambda: default_work_directory(current_load().environ))
    # Delta Lake tables beside the JSONL, under <output>/tables/<table>/ (graphsync.tables).
    tables: bool = False
    # How often the fleet compacts, vacuums and checkpoints the tables (once per slot, by one replica).
    tables_upkeep_every: Annotated[str, AfterValidator(check_interval)] = "1d"

    @model_validator(mode="after")
    def _defaults(self) -> Self:
        require_one(self, ("directory", "container"), "output destination", required=False)
        if self.container is None and self.directory is None:
            self.directory = DEFAULT_OUTPUT_DIRECTORY
        return self


class MetricsSettings(BaseModel):
    """[metrics]: the Prometheus endpoint; no port means no metrics server."""

    model_config = ConfigDict(extra="forbid")

    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    host: NonEmptyStr = "127.0.0.1"


def _interval_or_off(value: str) -> str:
    if value != RECONCILE_OFF:
        try:
            interval_seconds(value)
        except ValueError:
            raise ValueError(
                f'expected "{RECONCILE_OFF}" (off) or a positive whole number and a unit s, m, h or d, e.g. "6d"'
            ) from None
    return value


class RunSettings(BaseModel):
    """[run]: how many (tenant, job) runs one process does at once, in ``sync`` and in the daemon alike.

    Graph throttles per app and tenant, so a second bound per tenant keeps one big tenant from taking every worker
    and one tenant's jobs from throttling each other.
    """

    model_config = ConfigDict(extra="forbid")

    concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 8
    per_tenant: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 2


class JobSettings(BaseModel):
    """[[jobs]]: one Graph collection exported on a schedule.

    The kind of job follows from its keys: a full listing, a delta query (``delta``, optionally ``expand`` and
    ``reconcile_every``), or a time-cursor read of a log (``cursor``, ``since``, ``overlap``, ``max_pages``). Keys
    of another kind are errors rather than ignored, so that a job never silently does less than its file says.
    """

    model_config = ConfigDict(extra="forbid")

    name: JobName
    resource: ResourcePath
    delta: bool = False
    select: Annotated[list[PropertyName], Field(min_length=1)] | None = None
    expand: Annotated[list[PropertyName], Field(min_length=1), AfterValidator(unique)] | None = None
    # Below the directory delta token's 7-day lifetime, so a job that runs at all never needs an unplanned resync.
    reconcile_every: Annotated[str, AfterValidator(_interval_or_off)] = "6d"
    cursor: PropertyName | None = None
    since: Annotated[str, AfterValidator(check_interval)] = "7d"
    overlap: Annotated[str, AfterValidator(check_interval)] = "1h"
    # The reporting APIs allow 5 requests per 10 seconds per app and tenant: a run reads a bounded number of pages.
    max_pages: Annotated[int, Field(ge=1, le=1000)] = 20
    every: Annotated[str, AfterValidator(check_interval)] | None = None
    cron: Annotated[str, AfterValidator(check_crontab)] | None = None
    tenants: Annotated[list[Tenant], AfterValidator(unique)] = []

    @model_validator(mode="after")
    def _one_schedule(self) -> Self:
        require_one(self, ("every", "cron"), "schedule")
        return self

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        """Keys of one kind of job only, and only what Graph serves for the resource."""
        problems = self._cursor_problems() if self.cursor is not None else self._collection_problems()
        if problems:
            raise key_errors(problems)
        return self

    def _cursor_problems(self) -> list[tuple[Loc, str]]:
        assert self.cursor is not None
        problems: list[tuple[Loc, str]] = []
        if self.delta:
            problems.append((("cursor",), "cannot be combined with delta = true: a log read by time has no delta"))
        if problem := cursor_problem(self.resource, self.cursor):
            problems.append((("cursor",), problem))
        if self.expand is not None:
            problems.append((("expand",), "is only used by delta jobs, not with cursor"))
        if "reconcile_every" in self.model_fields_set:
            problems.append((("reconcile_every",), "is only used by delta jobs: a cursor job keeps no snapshot"))
        return problems

    def _collection_problems(self) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = [
            ((key,), "is only used with cursor (a log read by time)")
            for key in ("since", "overlap", "max_pages")
            if key in self.model_fields_set
        ]
        if (log_cursor := LOG_CURSORS.get(self.resource)) is not None:
            key = "delta" if self.delta else "cursor"
            problems.append(((key,), f'{self.resource} has no delta query: read it by time, cursor = "{log_cursor}"'))
        if self.expand is not None:
            if not self.delta:
                problems.append(
                    (("expand",), "needs delta = true: Graph reports links as <name>@delta in delta rounds")
                )
            elif problem := expand_problem(self.resource, self.expand):
                problems.append((("expand",), problem))
        if not self.delta and "reconcile_every" in self.model_fields_set:
            problems.append((("reconcile_every",), "is only used by delta jobs: every run of this job is a full round"))
        if self.delta and self.resource in SINGLETONS:
            problems.append((("delta",), f"{self.resource} is a single object: Graph has no delta for it"))
        return problems

    @property
    def interval_seconds(self) -> int | None:
        """``every`` in seconds; None for a cron job."""
        return None if self.every is None else interval_seconds(self.every)

    @property
    def reconcile_seconds(self) -> int | None:
        """How often a delta job's run is a full round compared with its snapshot; None: never."""
        if not self.delta or self.reconcile_every == RECONCILE_OFF:
            return None
        return interval_seconds(self.reconcile_every)


class Settings(BaseSettings):
    """The whole configuration; build it with load_settings() to get readable errors."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, extra="forbid")

    log_level: LogLevel = "INFO"
    # Validated from an empty table when absent, so a missing section reports each missing key by name.
    identity: IdentitySettings = Field(default_factory=dict, validate_default=True)
    storage: StorageSettings = Field(default_factory=dict, validate_default=True)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    graph: GraphSettings = Field(default_factory=GraphSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    notifications: NotificationSettings | None = None
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
        return (init_settings, *(current_load().sources or (env_settings,)))

    @model_validator(mode="before")
    @classmethod
    def _expand_presets(cls, data: Any) -> Any:
        """``[[jobs]] preset = "entra"`` becomes the preset's jobs (:mod:`graphsync.config.presets`)."""
        if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
            return data
        jobs, problems = expand_presets(data["jobs"])
        if problems:
            raise key_errors(problems)
        return {**data, "jobs": jobs}

    @model_validator(mode="after")
    def _check_jobs(self) -> Self:
        problems: list[tuple[Loc, str]] = []
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
        if self.output.tables:
            problems += self._table_problems()
        if problems:
            raise key_errors(problems)
        return self

    def _table_problems(self) -> list[tuple[Loc, str]]:
        """With tables, a collection's table takes its columns from ``select``, and one job per tenant writes it
        (a full round of one job would delete the rows of another)."""
        problems: list[tuple[Loc, str]] = []
        writer: dict[tuple[str, str], int] = {}
        for index, job in enumerate(self.jobs):
            if job.select is None:
                problems.append((("jobs", index, "select"), "is required with output.tables: it names the columns"))
            for tenant in self.job_tenants(job):
                other = writer.setdefault((tenant, job.resource), index)
                if other != index:
                    problems.append(
                        (
                            ("jobs", index, "resource"),
                            f"jobs[{other}] exports {job.resource} for {tenant} too; with output.tables one job per "
                            "tenant may write a collection's table",
                        )
                    )
                    break
        return problems

    def job_tenants(self, job: JobSettings) -> list[str]:
        """The tenants a job runs for: its own subset, or every configured tenant when it names none."""
        return list(job.tenants or self.identity.tenants)
