"""graphsync.config: loading, precedence, and error reports that name key, origin and expectation, never a secret."""

import base64
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from pydantic import SecretStr

from graphsync import config
from graphsync.config import (
    ConfigError,
    FederatedCredential,
    SecretCredential,
    find_config_file,
    load_settings,
    loading,
)
from graphsync.preflight import setup_warnings

SECRET = "s3cr3t-VALUE-123"
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "graphsync.example.toml"
KEY = bytes(range(32))
OLD_KEY = bytes(range(32, 64))

IDENTITY = """
[identity]
client_id = "11111111-1111-1111-1111-111111111111"
tenants = ["contoso.onmicrosoft.com", "fabrikam.onmicrosoft.com"]
"""
SECRET_FILE = 'client_secret_file = "client-secret"\n'
STORAGE = """
[storage]
account_url = "https://contoso.blob.core.windows.net"
"""
MINIMAL = IDENTITY + SECRET_FILE + STORAGE


def write(directory: Path, text: str, name: str = "graphsync.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def write_secret(directory: Path) -> Path:
    return write(directory, SECRET + "\n", "client-secret")


def write_key(directory: Path, name: str, key: bytes = KEY) -> Path:
    return write(directory, base64.b64encode(key).decode() + "\n", name)


def config_error(config_file: Path | None, environ: dict[str, str] | None = None) -> str:
    """Load, expect a ConfigError, and check that it never leaks the secret."""
    with pytest.raises(ConfigError) as info:
        load_settings(config_file, environ or {})
    message = str(info.value)
    assert message == "\n".join(info.value.problems)
    assert SECRET not in message
    return message


# --- loading -------------------------------------------------------------------------------------


def test_full_file_loads(tmp_path: Path) -> None:
    write_secret(tmp_path)
    write_key(tmp_path, "key")
    write_key(tmp_path, "old-key", OLD_KEY)
    path = write(
        tmp_path,
        """
log_level = "debug"

[identity]
client_id = "11111111-1111-1111-1111-111111111111"
tenants = ["Contoso.onmicrosoft.com", "22222222-2222-2222-2222-222222222222"]
authority_host = "https://login.microsoftonline.us/"
scopes = ["https://graph.microsoft.us/.default"]
client_secret_file = "client-secret"

[storage]
account_url = "http://127.0.0.1:10000/devstoreaccount1"
container = "token-caches"
encryption_key_file = "key"
previous_encryption_key_files = ["old-key"]
timeout_seconds = 2.5

[cache]
prefix = "tokens"
lease_seconds = 60
lock_wait_seconds = 5

[graph]
endpoint = "http://localhost:8080/"
api_version = "beta"
timeout_seconds = 10
max_retries = 0

[output]
container = "exports"

[metrics]
port = 9000
host = "0.0.0.0"

[[jobs]]
name = "users"
resource = "users"
delta = true
select = ["id", "displayName", "@odata.type"]
every = "1h"

[[jobs]]
name = "members"
resource = "groups/33333333-3333-3333-3333-333333333333/members"
cron = "*/5 * * * 1-5"
tenants = ["contoso.onmicrosoft.com"]
""",
    )

    settings = load_settings(path, {})

    assert settings.log_level == "DEBUG"
    identity = settings.identity
    assert identity.tenants == ["contoso.onmicrosoft.com", "22222222-2222-2222-2222-222222222222"]
    assert identity.authority_host == "https://login.microsoftonline.us"
    assert identity.scopes == ["https://graph.microsoft.us/.default"]
    assert isinstance(identity.credential, SecretCredential)
    assert identity.client_secret is not None
    assert identity.client_secret.get_secret_value() == SECRET
    assert identity.client_secret_file == tmp_path / "client-secret"
    storage = settings.storage
    assert storage.account_url == "http://127.0.0.1:10000/devstoreaccount1"
    assert storage.container == "token-caches"
    assert storage.encryption_keys == [KEY, OLD_KEY]
    assert storage.timeout_seconds == 2.5
    assert (settings.cache.prefix, settings.cache.lease_seconds, settings.cache.lock_wait_seconds) == (
        "tokens",
        60,
        5.0,
    )
    assert settings.graph.endpoint == "http://localhost:8080"
    assert (settings.graph.api_version, settings.graph.timeout_seconds, settings.graph.max_retries) == ("beta", 10, 0)
    assert (settings.output.directory, settings.output.container) == (None, "exports")
    assert (settings.metrics.port, settings.metrics.host) == (9000, "0.0.0.0")
    users, members = settings.jobs
    assert (users.delta, users.select, users.interval_seconds, users.cron) == (
        True,
        ["id", "displayName", "@odata.type"],
        3600,
        None,
    )
    assert (members.delta, members.every, members.interval_seconds) == (False, None, None)
    assert settings.job_tenants(users) == identity.tenants
    assert settings.job_tenants(members) == ["contoso.onmicrosoft.com"]


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    write_secret(tmp_path)

    settings = load_settings(write(tmp_path, MINIMAL), {})

    assert settings.log_level == "INFO"
    assert settings.identity.authority_host == "https://login.microsoftonline.com"
    assert settings.identity.scopes == ["https://graph.microsoft.com/.default"]
    assert settings.storage.container == "graphsync"
    assert settings.storage.encryption_keys == []
    assert settings.storage.timeout_seconds == 5.0
    assert (settings.cache.prefix, settings.cache.lease_seconds, settings.cache.lock_wait_seconds) == (
        "token-cache",
        15,
        20.0,
    )
    assert settings.graph.endpoint == "https://graph.microsoft.com"
    assert (settings.graph.api_version, settings.graph.timeout_seconds, settings.graph.max_retries) == ("v1.0", 30, 5)
    assert (settings.output.directory, settings.output.container) == (config.DEFAULT_OUTPUT_DIRECTORY, None)
    assert (settings.metrics.port, settings.metrics.host) == (None, "127.0.0.1")
    assert settings.jobs == []


def test_example_config_loads(tmp_path: Path) -> None:
    write_secret(tmp_path)
    write_key(tmp_path, "cache-key")

    settings = load_settings(EXAMPLE, {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert isinstance(settings.identity.credential, SecretCredential)
    assert settings.storage.encryption_keys == [KEY]
    assert [job.name for job in settings.jobs] == ["users", "group-members"]


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    models = [
        config.Settings,
        config.IdentitySettings,
        config.StorageSettings,
        config.CacheSettings,
        config.GraphSettings,
        config.OutputSettings,
        config.MetricsSettings,
        config.RunSettings,
        config.JobSettings,
        config.NotificationSettings,
    ]
    for model in models:
        for key in model.model_fields:
            assert f"{key} = " in text or f"[{key}]" in text, key


def test_environment_overrides_file(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL)

    environ = {"GRAPHSYNC_IDENTITY__CLIENT_ID": "from-env", "GRAPHSYNC_CACHE__LEASE_SECONDS": "30"}

    settings = load_settings(path, environ)

    assert settings.identity.client_id == "from-env"
    assert settings.identity.tenants == ["contoso.onmicrosoft.com", "fabrikam.onmicrosoft.com"]
    assert settings.cache.lease_seconds == 30


def test_environment_lists_are_json(tmp_path: Path) -> None:
    write_secret(tmp_path)
    environ = {
        "GRAPHSYNC_IDENTITY__TENANTS": '["contoso.onmicrosoft.com"]',
        "GRAPHSYNC_JOBS": '[{"name": "users", "resource": "users", "every": "30s"}]',
    }

    settings = load_settings(write(tmp_path, MINIMAL), environ)

    assert settings.identity.tenants == ["contoso.onmicrosoft.com"]
    assert [(job.name, job.interval_seconds) for job in settings.jobs] == [("users", 30)]


def test_environment_only_configuration() -> None:
    environ = {
        "GRAPHSYNC_IDENTITY__CLIENT_ID": "app",
        "GRAPHSYNC_IDENTITY__TENANTS": '["contoso.onmicrosoft.com"]',
        "GRAPHSYNC_IDENTITY__CLIENT_SECRET": SECRET,
        "GRAPHSYNC_STORAGE__CONNECTION_STRING": SECRET,
        "GRAPHSYNC_CONFIG": "/not/a/setting.toml",
    }

    settings = load_settings(None, environ)

    assert settings.identity.client_secret == SecretStr(SECRET)
    assert settings.storage.connection_string == SecretStr(SECRET)


@pytest.mark.parametrize(("value", "expected"), [("debug", "DEBUG"), ("Warning", "WARNING"), ("ERROR", "ERROR")])
def test_log_level_from_environment_is_case_insensitive(tmp_path: Path, value: str, expected: str) -> None:
    write_secret(tmp_path)

    settings = load_settings(write(tmp_path, MINIMAL), {"GRAPHSYNC_LOG_LEVEL": value})

    assert settings.log_level == expected


def test_workload_identity_variables_fill_unset_keys(tmp_path: Path) -> None:
    token_file = write(tmp_path, "a-jwt", "token")
    environ = {
        "AZURE_CLIENT_ID": "workload-app",
        "AZURE_TENANT_ID": "44444444-4444-4444-4444-444444444444",
        "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
    }

    settings = load_settings(write(tmp_path, STORAGE), environ)

    identity = settings.identity
    assert identity.client_id == "workload-app"
    assert identity.tenants == ["44444444-4444-4444-4444-444444444444"]
    assert identity.authority_host == "https://login.microsoftonline.com"
    assert identity.federated_token_file == token_file
    assert isinstance(identity.credential, FederatedCredential)


def test_workload_identity_variables_never_override_configured_keys(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL.replace("[identity]", '[identity]\nauthority_host = "https://login.example.test"'))
    environ = {
        "AZURE_CLIENT_ID": "workload-app",
        "AZURE_TENANT_ID": "44444444-4444-4444-4444-444444444444",
        "AZURE_FEDERATED_TOKEN_FILE": str(write(tmp_path, "a-jwt", "token")),
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
        "GRAPHSYNC_IDENTITY__CLIENT_ID": "env-app",
    }

    identity = load_settings(path, environ).identity

    assert identity.client_id == "env-app"
    assert identity.tenants == ["contoso.onmicrosoft.com", "fabrikam.onmicrosoft.com"]
    assert identity.authority_host == "https://login.example.test"
    assert identity.federated_token_file is None
    assert isinstance(identity.credential, SecretCredential)


def test_bad_workload_identity_variable_is_named(tmp_path: Path) -> None:
    environ = {
        "AZURE_CLIENT_ID": "workload-app",
        "AZURE_TENANT_ID": "not a tenant",
        "AZURE_FEDERATED_TOKEN_FILE": str(tmp_path / "absent-token"),
    }

    message = config_error(write(tmp_path, STORAGE), environ)

    assert "identity.tenants[0] (from env AZURE_TENANT_ID): expected a tenant GUID or domain name" in message
    assert f"identity.federated_token_file (from env AZURE_FEDERATED_TOKEN_FILE): cannot read {tmp_path}" in message


def test_relative_files_resolve_against_credentials_directory(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write_secret(credentials)
    write_key(credentials, "key")
    path = write(tmp_path, MINIMAL + 'encryption_key_file = "key"\n')

    settings = load_settings(path, {"CREDENTIALS_DIRECTORY": str(credentials)})

    assert settings.identity.client_secret_file == credentials / "client-secret"
    assert settings.storage.encryption_key_file == credentials / "key"
    assert settings.storage.encryption_keys == [KEY]


def test_relative_files_resolve_against_config_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    write_secret(tmp_path / "etc")

    settings = load_settings(write(tmp_path / "etc", MINIMAL), {})

    assert settings.identity.client_secret_file == tmp_path / "etc" / "client-secret"


def test_relative_files_resolve_against_working_directory_without_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_secret(tmp_path)
    environ = {
        "GRAPHSYNC_IDENTITY__CLIENT_ID": "app",
        "GRAPHSYNC_IDENTITY__TENANTS": '["contoso.onmicrosoft.com"]',
        "GRAPHSYNC_IDENTITY__CLIENT_SECRET_FILE": "client-secret",
        "GRAPHSYNC_STORAGE__ACCOUNT_URL": "https://contoso.blob.core.windows.net",
    }

    settings = load_settings(None, environ)

    assert settings.identity.client_secret_file == tmp_path / "client-secret"


def test_secrets_and_keys_stay_out_of_repr_and_dump(tmp_path: Path) -> None:
    write_secret(tmp_path)
    write_key(tmp_path, "key")
    settings = load_settings(write(tmp_path, MINIMAL + 'encryption_key_file = "key"\n'), {})

    for text in (repr(settings), str(settings.model_dump()), settings.model_dump_json()):
        assert SECRET not in text
        assert "encryption_keys" not in text
        assert base64.b64encode(KEY).decode() not in text
        assert repr(KEY) not in text


# --- find_config_file ------------------------------------------------------------------------------


def test_find_config_file_prefers_command_line(tmp_path: Path) -> None:
    cli, env = write(tmp_path, "", "cli.toml"), write(tmp_path, "", "env.toml")

    assert find_config_file(str(cli), {"GRAPHSYNC_CONFIG": str(env)}) == cli


def test_find_config_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = write(tmp_path, "", "env.toml")
    monkeypatch.setattr(loading, "DEFAULT_CONFIG_PATH", write(tmp_path, "", "default.toml"))

    assert find_config_file(None, {"GRAPHSYNC_CONFIG": str(env)}) == env


def test_find_config_file_then_default_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = write(tmp_path, "", "default.toml")
    monkeypatch.setattr(loading, "DEFAULT_CONFIG_PATH", default)

    assert find_config_file(None, {}) == default


def test_find_config_file_none_without_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")

    assert find_config_file(None, {}) is None


@pytest.mark.parametrize(
    ("cli_path", "environ", "origin"),
    [("missing.toml", {}, "--config"), (None, {"GRAPHSYNC_CONFIG": "missing.toml"}, "GRAPHSYNC_CONFIG")],
)
def test_find_config_file_rejects_missing_explicit_path(
    tmp_path: Path, cli_path: str | None, environ: dict[str, str], origin: str
) -> None:
    missing = str(tmp_path / "missing.toml")
    cli_path = missing if cli_path else None
    environ = {name: missing for name in environ}

    with pytest.raises(ConfigError) as info:
        find_config_file(cli_path, environ)

    assert missing in str(info.value)
    assert origin in str(info.value)


# --- errors ----------------------------------------------------------------------------------------


def test_missing_required_key_names_key_and_where_to_set_it(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL.replace('client_id = "11111111-1111-1111-1111-111111111111"\n', ""))

    message = config_error(path)

    assert f"identity.client_id (not set): required; set identity.client_id in {path} or " in message
    assert "GRAPHSYNC_IDENTITY__CLIENT_ID" in message


def test_missing_section_names_each_missing_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, STORAGE))

    assert "identity.client_id (not set)" in message
    assert "identity.tenants (not set)" in message


def test_missing_credential_names_the_choices(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, IDENTITY + STORAGE))

    assert "identity (not set): no credential" in message
    for key in ("client_secret", "client_secret_file", "certificate_file", "federated_token_file"):
        assert f"identity.{key}" in message


def test_two_credentials_conflict_naming_both_origins(tmp_path: Path) -> None:
    write(tmp_path, "PEM", "app.pem")
    path = write(tmp_path, IDENTITY + 'certificate_file = "app.pem"\n' + STORAGE)

    message = config_error(path, {"GRAPHSYNC_IDENTITY__CLIENT_SECRET": SECRET})

    assert "conflicting keys" in message
    assert "identity.client_secret (from env GRAPHSYNC_IDENTITY__CLIENT_SECRET)" in message
    assert f"identity.certificate_file (from {path})" in message
    assert "set exactly one credential" in message


def test_connection_string_and_account_url_conflict(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + f'connection_string = "AccountKey={SECRET}"\n')

    message = config_error(path)

    assert f"storage.connection_string (from {path})" in message
    assert f"storage.account_url (from {path})" in message
    assert "set exactly one storage account" in message


def test_every_and_cron_conflict(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + '[[jobs]]\nname = "users"\nresource = "users"\nevery = "1h"\ncron = "0 * * * *"\n')

    message = config_error(path)

    assert f"jobs[0].every (from {path}) and jobs[0].cron (from {path})" in message
    assert "set exactly one schedule" in message


def test_job_without_schedule(tmp_path: Path) -> None:
    write_secret(tmp_path)

    message = config_error(write(tmp_path, MINIMAL + '[[jobs]]\nname = "users"\nresource = "users"\n'))

    assert "jobs[0] (not set): no schedule; set one of jobs[0].every, jobs[0].cron" in message


def test_output_directory_and_container_conflict(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + '[output]\ndirectory = "/srv/out"\ncontainer = "exports"\n')

    message = config_error(path)

    assert f"output.directory (from {path}) and output.container (from {path})" in message
    assert "set at most one output destination" in message


@pytest.mark.parametrize(
    ("table", "line", "key"),
    [
        ("identity", 'authority_host = "http://login.microsoftonline.com"', "identity.authority_host"),
        ("identity", 'authority_host = "https://login.microsoftonline.com/tenant"', "identity.authority_host"),
        ("identity", 'authority_host = "not a url"', "identity.authority_host"),
        ("graph", 'endpoint = "http://graph.example.com"', "graph.endpoint"),
        ("storage", f'account_url = "https://contoso.blob.core.windows.net/?sig={SECRET}"', "storage.account_url"),
    ],
)
def test_bad_url(tmp_path: Path, table: str, line: str, key: str) -> None:
    write_secret(tmp_path)
    text = MINIMAL.replace('account_url = "https://contoso.blob.core.windows.net"\n', "")
    if f"[{table}]" not in text:
        text += f"[{table}]\n"
    path = write(tmp_path, text.replace(f"[{table}]", f"[{table}]\n{line}"))

    message = config_error(path)

    assert f"{key} (from {path}): expected an http" in message


def test_wrong_type_in_file(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + '[cache]\nlease_seconds = "soon"\nlock_wait_seconds = 0\n')

    message = config_error(path)

    assert f"cache.lease_seconds (from {path}): Input should be a valid integer" in message
    assert f"cache.lock_wait_seconds (from {path}): Input should be greater than 0" in message


def test_wrong_type_in_environment(tmp_path: Path) -> None:
    write_secret(tmp_path)

    message = config_error(write(tmp_path, MINIMAL), {"GRAPHSYNC_METRICS__PORT": "http", "GRAPHSYNC_LOG_LEVEL": "loud"})

    assert "metrics.port (from env GRAPHSYNC_METRICS__PORT): Input should be a valid integer" in message
    assert "log_level (from env GRAPHSYNC_LOG_LEVEL): Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'" in message


def test_lease_seconds_out_of_range(tmp_path: Path) -> None:
    write_secret(tmp_path)

    message = config_error(write(tmp_path, MINIMAL + "[cache]\nlease_seconds = 90\n"))

    assert "cache.lease_seconds" in message
    assert "less than or equal to 60" in message


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("GRAPHSYNC_IDENTITY__TENANTS", "contoso.onmicrosoft.com", "identity.tenants"),
        ("GRAPHSYNC_JOBS", '[{"name": "users"', "jobs"),
        ("GRAPHSYNC_IDENTITY", f'{{"client_secret": "{SECRET}"', "identity"),
    ],
)
def test_invalid_json_in_environment_names_the_variable(tmp_path: Path, variable: str, value: str, key: str) -> None:
    write_secret(tmp_path)

    message = config_error(write(tmp_path, MINIMAL), {variable: value})

    assert message.startswith(f"{key} (from env {variable}): not valid JSON")


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, f'[identity]\nclient_secret = "{SECRET}"\nclient_id = \n')

    message = config_error(path)

    assert f"config file {path}: invalid TOML" in message
    assert "line 3" in message


@pytest.mark.parametrize("make", [lambda directory: directory / "absent.toml", lambda directory: directory])
def test_unreadable_config_file_is_named(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    path = make(tmp_path)

    message = config_error(path)

    assert f"config file {path}" in message


def test_missing_secret_file_names_key_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)

    message = config_error(path)

    assert f"identity.client_secret_file (from {path}): cannot read {tmp_path / 'client-secret'}" in message


def test_empty_secret_file(tmp_path: Path) -> None:
    write(tmp_path, " \n", "client-secret")

    message = config_error(write(tmp_path, MINIMAL))

    assert f"identity.client_secret_file (from {tmp_path / 'graphsync.toml'}): " in message
    assert "is empty" in message


@pytest.mark.parametrize("key", ["certificate_file", "federated_token_file"])
def test_missing_credential_file_names_key_and_path(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, IDENTITY + f'{key} = "absent"\n' + STORAGE)

    message = config_error(path)

    assert f"identity.{key} (from {path}): cannot read {tmp_path / 'absent'}" in message


def test_certificate_options_need_a_certificate(tmp_path: Path) -> None:
    write_secret(tmp_path)
    write(tmp_path, "password", "password")
    options = 'certificate_password_file = "password"\nsend_certificate_chain = true\n'
    text = MINIMAL.replace(SECRET_FILE, SECRET_FILE + options)

    message = config_error(write(tmp_path, text))

    assert "identity.certificate_password_file" in message
    assert "identity.send_certificate_chain" in message


def test_unknown_key_in_file_with_suggestion(tmp_path: Path) -> None:
    write_secret(tmp_path)
    text = MINIMAL.replace(SECRET_FILE, SECRET_FILE + f'client_secert = "{SECRET}"\n')
    text = text.replace("[storage]", "[storage]\ncontainer_name = 'x'")
    path = write(tmp_path, text + '[[jobs]]\nname = "a"\nresource = "users"\nevry = "1h"\n[graf]\n')

    message = config_error(path)

    assert f"identity.client_secert (from {path}): unknown key; did you mean identity.client_secret?" in message
    assert f"storage.container_name (from {path}): unknown key; did you mean storage.container?" in message
    assert f"jobs[0].evry (from {path}): unknown key; did you mean jobs[0].every?" in message
    assert f"graf (from {path}): unknown key; did you mean graph?" in message


def test_unknown_environment_variables_with_suggestion(tmp_path: Path) -> None:
    write_secret(tmp_path)
    environ = {
        "GRAPHSYNC_IDENTITY__CLIENT_SECERT": SECRET,
        "GRAPHSYNC_IDENTTY__CLIENT_ID": "app",
        "GRAPHSYNC_LOG_LEVEL__DEBUG": "1",
        "GRAPHSYNC_NONSENSE": SECRET,
    }

    message = config_error(write(tmp_path, MINIMAL), environ)

    assert (
        "identity.client_secert (from env GRAPHSYNC_IDENTITY__CLIENT_SECERT): unknown key; "
        "did you mean GRAPHSYNC_IDENTITY__CLIENT_SECRET?"
    ) in message
    assert "(from env GRAPHSYNC_IDENTTY__CLIENT_ID): unknown key; did you mean GRAPHSYNC_IDENTITY__CLIENT_ID" in message
    assert "(from env GRAPHSYNC_LOG_LEVEL__DEBUG): unknown key; did you mean GRAPHSYNC_LOG_LEVEL?" in message
    assert "(from env GRAPHSYNC_NONSENSE): unknown key" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"not base64: {SECRET}", "does not hold base64 text"),
        (base64.b64encode(SECRET.encode()).decode(), "decodes to 16 bytes; expected the base64 of a 32-byte"),
    ],
)
def test_bad_key_file_content(tmp_path: Path, content: str, expected: str) -> None:
    write_secret(tmp_path)
    write_key(tmp_path, "key")
    write(tmp_path, content, "old-key")
    path = write(tmp_path, MINIMAL + 'encryption_key_file = "key"\nprevious_encryption_key_files = ["old-key"]\n')

    message = config_error(path)

    assert f"storage.previous_encryption_key_files[0] (from {path}): {tmp_path / 'old-key'} {expected}" in message


def test_previous_keys_need_a_current_key(tmp_path: Path) -> None:
    write_secret(tmp_path)
    write_key(tmp_path, "old-key")

    message = config_error(write(tmp_path, MINIMAL + 'previous_encryption_key_files = ["old-key"]\n'))

    assert "storage.previous_encryption_key_files" in message
    assert "needs storage.encryption_key_file" in message


def test_missing_key_file_names_key_and_path(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + 'encryption_key_file = "absent-key"\n')

    message = config_error(path)

    assert f"storage.encryption_key_file (from {path}): cannot read {tmp_path / 'absent-key'}" in message


def test_duplicate_job_names(tmp_path: Path) -> None:
    write_secret(tmp_path)
    job = '[[jobs]]\nname = "users"\nresource = "users"\nevery = "1h"\n'
    path = write(tmp_path, MINIMAL + job + job)

    message = config_error(path)

    assert f"jobs[1].name (from {path}): duplicate job name; jobs[0] has the same name" in message


@pytest.mark.parametrize(
    ("schedule", "key", "expected"),
    [
        ('every = "15"', "every", "expected a positive whole number and a unit"),
        ('every = "0m"', "every", "expected a positive whole number and a unit"),
        ('every = "1w"', "every", "expected a positive whole number and a unit"),
        ('cron = "0 * * *"', "cron", "expected a 5-field crontab expression"),
        ('cron = "61 * * * *"', "cron", "expected a 5-field crontab expression"),
    ],
)
def test_bad_schedule(tmp_path: Path, schedule: str, key: str, expected: str) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + f'[[jobs]]\nname = "users"\nresource = "users"\n{schedule}\n')

    message = config_error(path)

    assert f"jobs[0].{key} (from {path}): {expected}" in message


def test_job_tenants_must_be_configured_tenants(tmp_path: Path) -> None:
    write_secret(tmp_path)
    job = '[[jobs]]\nname = "users"\nresource = "users"\nevery = "1h"\n'
    path = write(tmp_path, MINIMAL + job + 'tenants = ["contoso.onmicrosoft.com", "other.com"]\n')

    message = config_error(path)

    assert f"jobs[0].tenants[1] (from {path}): is not one of identity.tenants" in message


@pytest.mark.parametrize(
    "resource", ["/users", "users?$top=5", "groups/../users", "users/", "", "groups/{id}/members", "https://x/users"]
)
def test_bad_resource(tmp_path: Path, resource: str) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + f'[[jobs]]\nname = "users"\nresource = "{resource}"\nevery = "1h"\n')

    message = config_error(path)

    assert f"jobs[0].resource (from {path}): expected a collection path under the API version" in message


@pytest.mark.parametrize("name", ["ab", "Graphsync", "token--cache", "-cache", "cache-", "a" * 64, "token_cache"])
def test_bad_container_name(tmp_path: Path, name: str) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + f'container = "{name}"\n')

    message = config_error(path)

    assert f"storage.container (from {path}): expected a blob container name" in message


@pytest.mark.parametrize(
    ("tenants", "key", "expected"),
    [
        ('["common"]', "identity.tenants[0]", "expected a tenant GUID or domain name"),
        ('["contoso.com", "not a domain"]', "identity.tenants[1]", "expected a tenant GUID or domain name"),
        ('["Contoso.com", "contoso.com"]', "identity.tenants", "entries must be unique; entry 1 repeats entry 0"),
        ("[]", "identity.tenants", "List should have at least 1 item"),
    ],
)
def test_bad_tenants(tmp_path: Path, tenants: str, key: str, expected: str) -> None:
    write_secret(tmp_path)
    text = MINIMAL.replace('tenants = ["contoso.onmicrosoft.com", "fabrikam.onmicrosoft.com"]', f"tenants = {tenants}")
    path = write(tmp_path, text)

    message = config_error(path)

    assert f"{key} (from {path}): {expected}" in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + 'container = "X"\n[cache]\nlease_seconds = 1\n[graph]\napi_version = "v2"\n')

    with pytest.raises(ConfigError) as info:
        load_settings(path, {})

    assert [problem.split(" ")[0] for problem in info.value.problems] == [
        "storage.container",
        "cache.lease_seconds",
        "graph.api_version",
    ]


def test_config_error_does_not_chain_pydantic_errors(tmp_path: Path) -> None:
    """A chained ValidationError would print its inputs, secrets included, in a traceback."""
    path = write(tmp_path, IDENTITY + f'client_secret = "{SECRET}"\ncertificate_file = 3\n' + STORAGE)

    with pytest.raises(ConfigError) as info:
        load_settings(path, {})

    assert info.value.__cause__ is None
    assert info.value.__context__ is None


@pytest.mark.parametrize(
    ("key_type", "expected"),
    [("ECDSA", "does not hold an RSA private key"), ("garbage", "cannot load a private key")],
)
def test_certificate_file_must_hold_an_rsa_key_and_certificate(tmp_path: Path, key_type: str, expected: str) -> None:
    if key_type == "garbage":
        (tmp_path / "app.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    else:
        leaf = trustme.CA().issue_cert("client", key_type=trustme.KeyType[key_type])
        (tmp_path / "app.pem").write_bytes(leaf.private_key_and_cert_chain_pem.bytes())
    path = write(tmp_path, IDENTITY + 'certificate_file = "app.pem"\n' + STORAGE)
    message = config_error(path)
    assert f"identity.certificate_file (from {path})" in message
    assert expected in message


# --- kinds of job: delta links, reconciliation, logs read by time ----------------------------------


def job(lines: str) -> str:
    return f'[[jobs]]\nname = "j"\nevery = "1h"\n{lines}\n'


def test_job_kind_keys_get_defaults(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(
        tmp_path,
        MINIMAL
        + job('resource = "users"\ndelta = true\nexpand = ["manager"]')
        + job('resource = "auditLogs/signIns"\ncursor = "createdDateTime"').replace('"j"', '"k"'),
    )

    users, signins = load_settings(path, {}).jobs

    assert users.expand == ["manager"] and users.reconcile_seconds == 6 * 86400 and users.cursor is None
    assert (signins.cursor, signins.since, signins.overlap, signins.max_pages) == ("createdDateTime", "7d", "1h", 20)
    assert signins.reconcile_seconds is None


def test_check_warns_when_reconcile_every_is_not_longer_than_every(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(
        tmp_path,
        MINIMAL
        + job('resource = "users"\ndelta = true\nreconcile_every = "30m"')
        + job('resource = "groups"\ndelta = true').replace('"j"', '"k"'),
    )

    warnings = [w for w in setup_warnings(load_settings(path, {})) if w.name != "token cache encryption"]

    assert [w.name for w in warnings] == ["jobs[0].reconcile_every"]
    assert "job j runs every 1h but reconcile_every = '30m'" in warnings[0].detail and '"0"' in warnings[0].fix


def test_reconcile_every_zero_turns_reconciliation_off(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + job('resource = "users"\ndelta = true\nreconcile_every = "0"'))

    assert load_settings(path, {}).jobs[0].reconcile_seconds is None


@pytest.mark.parametrize(
    ("lines", "key", "expected"),
    [
        ('resource = "auditLogs/signIns"\ndelta = true\ncursor = "createdDateTime"', "cursor", "cannot be combined"),
        ('resource = "auditLogs/signIns"\ncursor = "activityDateTime"', "cursor", 'set cursor = "createdDateTime"'),
        ('resource = "auditLogs/directoryAudits"\ndelta = true', "delta", 'cursor = "activityDateTime"'),
        ('resource = "auditLogs/provisioning"', "cursor", "has no delta query"),
        ('resource = "users"\ndelta = true\nexpand = ["memberOf"]', "expand", "can expand only manager"),
        ('resource = "groups"\ndelta = true\nexpand = ["manager"]', "expand", "can expand only members"),
        ('resource = "servicePrincipals"\ndelta = true\nexpand = ["owners"]', "expand", "servicePrincipals has none"),
        ('resource = "users"\nexpand = ["manager"]', "expand", "needs delta = true"),
        ('resource = "users"\ndelta = true\nexpand = ["manager", "manager"]', "expand", "entries must be unique"),
        ('resource = "users"\nreconcile_every = "6d"', "reconcile_every", "only used by delta jobs"),
        ('resource = "users"\ndelta = true\nreconcile_every = "6 days"', "reconcile_every", 'expected "0" (off)'),
        ('resource = "users"\ndelta = true\nsince = "7d"', "since", "only used with cursor"),
        ('resource = "users"\novermax = 1', "overmax", "unknown key"),
        ('resource = "users"\nmax_pages = 5', "max_pages", "only used with cursor"),
        ('resource = "x/events"\ncursor = "time"\nmax_pages = 0', "max_pages", "greater than or equal to 1"),
        ('resource = "x/events"\ncursor = "time"\nexpand = ["a"]', "expand", "only used by delta jobs"),
        ('resource = "x/events"\ncursor = "time"\nreconcile_every = "1d"', "reconcile_every", "keeps no snapshot"),
        ('resource = "x/events"\ncursor = "time"\noverlap = "1 hour"', "overlap", "expected a positive whole"),
    ],
)
def test_bad_job_kind_combinations_name_the_key(tmp_path: Path, lines: str, key: str, expected: str) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + job(lines))

    message = config_error(path)

    origin = "not set" if key == "cursor" and "cursor =" not in lines else f"from {path}"
    assert f"jobs[0].{key} ({origin}): " in message and expected in message, message


def test_run_bounds_default_to_8_runs_and_2_per_tenant(tmp_path: Path) -> None:
    write_secret(tmp_path)

    settings = load_settings(write(tmp_path, MINIMAL))

    assert (settings.run.concurrency, settings.run.per_tenant) == (8, 2)


def test_run_bounds_must_be_whole_numbers_from_1_to_64(tmp_path: Path) -> None:
    write_secret(tmp_path)
    path = write(tmp_path, MINIMAL + "[run]\nconcurrency = 0\nper_tenant = 65\n")

    message = config_error(path)

    assert f"run.concurrency (from {path}): Input should be greater than or equal to 1" in message
    assert f"run.per_tenant (from {path}): Input should be less than or equal to 64" in message
