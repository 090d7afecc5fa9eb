"""The command line as an operator meets it: exit codes and messages for bad configuration, in a real process."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.fakes.entra import CLIENT_SECRET

if TYPE_CHECKING:
    from tests.conftest import RunGraphsync, WriteConfig

VALID = """
[identity]
client_id = "11111111-2222-3333-4444-555555555555"
tenants = ["contoso.onmicrosoft.com"]
client_secret = "{secret}"
[storage]
account_url = "https://contoso.blob.core.windows.net"
"""


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        pytest.param(
            VALID.replace('client_id = "11111111-2222-3333-4444-555555555555"\n', ""),
            {},
            "identity.client_id (not set)",
            id="missing key",
        ),
        pytest.param(
            VALID + "",
            {"GRAPHSYNC_IDENTITY__FEDERATED_TOKEN_FILE": "/etc/hostname"},
            "conflicting keys identity.client_secret",
            id="two credentials",
        ),
        pytest.param(
            VALID.replace("[storage]", '[storage]\nconnection_string = "UseDevelopmentStorage=true"'),
            {},
            "storage",
            id="connection string and account url",
        ),
        pytest.param(
            VALID.replace("[identity]", '[identity]\nauthority_host = "http://login.example.com"'),
            {},
            "identity.authority_host",
            id="bad url",
        ),
        pytest.param(
            VALID,
            {"GRAPHSYNC_IDENTITY__TENANTS": "contoso.onmicrosoft.com"},
            "GRAPHSYNC_IDENTITY__TENANTS",
            id="env list not json",
        ),
        pytest.param(
            VALID.replace("[storage]", "[storage]\ntimeout_seconds = 'soon'"),
            {},
            "storage.timeout_seconds",
            id="wrong type",
        ),
        pytest.param(VALID + "[graph\n", {}, "line", id="toml syntax"),
        pytest.param(
            VALID.replace('client_secret = "{secret}"', 'client_secret_file = "missing-secret"'),
            {},
            "identity.client_secret_file",
            id="unreadable secret file",
        ),
        pytest.param(VALID.replace("[storage]", "[storage]\ncontainr = 'x'"), {}, "storage.containr", id="unknown key"),
        pytest.param(
            VALID + '[[jobs]]\nname = "users"\nresource = "users"\nevery = "soon"\n',
            {},
            "jobs[0].every",
            id="bad interval",
        ),
    ],
)
def test_configuration_errors_exit_2_naming_the_key_without_leaking_secrets(
    tmp_path: Path, run_graphsync: RunGraphsync, text: str, env: dict[str, str], expected: str
) -> None:
    config = tmp_path / "graphsync.toml"
    config.write_text(text.replace("{secret}", CLIENT_SECRET))
    result = run_graphsync("token", "--config", str(config), env=env)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "configuration error" in result.stderr
    assert "Traceback" not in result.stderr
    assert CLIENT_SECRET not in result.stderr + result.stdout


def test_a_missing_config_file_is_named(run_graphsync: RunGraphsync, tmp_path: Path) -> None:
    result = run_graphsync("token", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr


def test_an_unknown_tenant_on_the_command_line_is_a_usage_error(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync
) -> None:
    result = run_graphsync("token", "--tenant", "fabrikam.onmicrosoft.com", "--config", str(graphsync_config()))
    assert result.returncode == 2
    assert "--tenant fabrikam.onmicrosoft.com is not in identity.tenants" in result.stderr


def test_configuration_from_the_environment_alone(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, tmp_path: Path
) -> None:
    """A container job often has no file at all: every key through GRAPHSYNC_<SECTION>__<KEY>."""

    document = tomllib.loads(graphsync_config().read_text())
    env = {
        f"GRAPHSYNC_{section.upper()}__{key.upper()}": value if isinstance(value, str) else str(value)
        for section, table in document.items()
        for key, value in table.items()
        if not isinstance(value, list)
    }
    env["GRAPHSYNC_IDENTITY__TENANTS"] = '["contoso.onmicrosoft.com"]'
    result = run_graphsync("token", "--json", env=env | {"GRAPHSYNC_CONFIG": ""})
    assert result.returncode == 0, result.stderr
    assert '"source": "identity_provider"' in result.stdout
