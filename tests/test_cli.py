"""The command line as an operator meets it: exit codes and messages for bad configuration, in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import REPO_ROOT
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


# What the command line must not import before it needs to: scripts call `graphsync token` per request, and
# `--version` or `--help` should answer at once. Top-level package names, as -X importtime reports them.
HEAVY = frozenset({"azure", "msal", "pydantic", "pydantic_settings", "rich", "apscheduler", "requests", "cryptography"})


def imported_packages(stderr: str) -> set[str]:
    """The top-level packages a process imported, from its ``-X importtime`` lines on stderr."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")
    }


def run_with_importtime(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "graphsync", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
@pytest.mark.parametrize("args", [["--version"], ["--help"], ["sync", "--help"], ["token", "--help"]], ids=" ".join)
def test_version_and_help_answer_without_importing_any_heavy_library(args: list[str]) -> None:
    result = run_with_importtime(*args)
    assert result.returncode == 0, result.stderr
    assert "graphsync" in result.stdout
    imported = imported_packages(result.stderr)
    assert "argparse" in imported  # the importtime lines were read: an empty set would pass anything
    assert not imported & HEAVY, f"graphsync {' '.join(args)} imported {sorted(imported & HEAVY)}"


@pytest.mark.integration
def test_a_usage_error_is_reported_before_the_configuration_is_loaded(tmp_path: Path) -> None:
    result = run_with_importtime("sync", "--parallel", "0", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "--parallel: expected a whole number from 1 to 64" in result.stderr
    assert not imported_packages(result.stderr) & HEAVY


@pytest.mark.integration
def test_a_configuration_error_imports_only_the_configuration_libraries(tmp_path: Path) -> None:
    config = tmp_path / "graphsync.toml"
    config.write_text(VALID.replace("[storage]", "[storage]\ncontainr = 'x'").replace("{secret}", CLIENT_SECRET))
    result = run_with_importtime("token", "--config", str(config))
    assert result.returncode == 2
    assert "storage.containr" in result.stderr
    imported = imported_packages(result.stderr)
    assert "pydantic_settings" in imported
    assert not imported & (HEAVY - {"pydantic", "pydantic_settings"})


def test_token_from_the_shared_cache_imports_neither_the_daemon_nor_the_reports_nor_azure_identity(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync
) -> None:
    """What `graphsync token` pays for is configuration, storage and MSAL: no scheduler, console or
    managed-identity libraries when the credential is a secret and the token is in the blob."""
    config = str(graphsync_config())
    first = run_graphsync("token", "--json", "--config", config)
    assert '"source": "identity_provider"' in first.stdout, first.stderr
    result = run_graphsync("token", "--json", "--config", config, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    assert '"source": "blob"' in result.stdout
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {"msal", "azure.storage.blob", "pydantic_settings"} <= modules
    unneeded = {"apscheduler", "rich", "azure.identity", "graphsync.jobs", "graphsync.console"}
    assert not modules & unneeded, sorted(modules & unneeded)
