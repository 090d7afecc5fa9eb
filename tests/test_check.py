"""`graphsync check` against the local fakes: all green on a good setup, and the named fix for each failure."""

from __future__ import annotations

import base64
import json
import os
from typing import TYPE_CHECKING, Any

from tests.conftest import AZURITE_KEY
from tests.fakes.graph import FakeGraph, populate

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

    from tests.conftest import Azurite, RunGraphsync, WriteConfig

TENANT = "contoso.onmicrosoft.com"
JOBS = [
    {"name": "users", "resource": "users", "delta": True, "every": "15m"},
    {"name": "groups", "resource": "groups", "every": "1h"},
]


def _config(graphsync_config: WriteConfig, fake_graph: FakeGraph, **extra: dict) -> str:
    populate(fake_graph, TENANT, users=5, groups=2)
    base = {"graph": {"endpoint": fake_graph.base_url}, "jobs": JOBS, "output": {"container": "exports"}}
    return str(graphsync_config(extra=base | extra))


def test_check_passes_on_a_working_setup(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph, blob_container: str
) -> None:
    result = run_graphsync("check", "--config", _config(graphsync_config, fake_graph))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "✓ configuration",
        f"✓ storage {blob_container}",
        "✓ storage exports",
        f"✓ token cache {TENANT}",
        f"✓ token {TENANT}",
        f"✓ graph {TENANT} users",
        f"✓ graph {TENANT} groups",
    ]


def test_check_names_the_fix_for_a_wrong_secret(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph
) -> None:
    config = _config(graphsync_config, fake_graph, identity={"client_secret": "not-the-secret-value"})
    result = run_graphsync("check", "--json", "--config", config)
    assert result.returncode == 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    [token] = [c for c in report["checks"] if c["name"] == f"token {TENANT}"]
    assert not token["ok"] and "AADSTS7000215" in token["detail"]
    assert "client secret is wrong" in token["fix"]
    assert not [c for c in report["checks"] if c["name"].startswith("graph")], "Graph needs a token: skipped"
    assert "not-the-secret-value" not in result.stdout + result.stderr


def test_check_names_the_fix_for_a_graph_403(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph
) -> None:
    config = _config(graphsync_config, fake_graph)
    fake_graph.deny(TENANT, "users")
    result = run_graphsync("check", "--config", config)
    assert result.returncode == 1
    assert f"✗ graph {TENANT} users: " in result.stdout and "Authorization_RequestDenied" in result.stdout
    assert "fix: grant the application permission User.Read.All" in result.stdout
    assert f"✓ graph {TENANT} groups" in result.stdout


def test_check_names_the_fix_for_a_wrong_storage_key(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph, azurite: Azurite
) -> None:
    wrong = azurite.connection_string.replace(AZURITE_KEY, "d3Jvbmcta2V5" * 8)
    result = run_graphsync(
        "check", "--config", _config(graphsync_config, fake_graph, storage={"connection_string": wrong})
    )
    assert result.returncode == 1
    # Azure answers AuthenticationFailed for a bad key; Azurite answers AuthorizationFailure
    assert "HTTP 403 AuthorizationFailure" in result.stdout, result.stdout
    assert "fix: the request was refused: check the account key" in result.stdout
    assert "d3Jvbmcta2V5" not in result.stdout + result.stderr


def _json_report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON object `check --json` ends with."""
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_check_warns_that_an_unencrypted_token_cache_exposes_tokens_and_still_passes(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph, blob_container: str
) -> None:
    config = _config(graphsync_config, fake_graph)
    text = run_graphsync("check", "--config", config)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "!" not in text.stdout, "the check lines on stdout are unchanged"
    assert (
        f"! token cache encryption: the token cache blobs in container {blob_container} are not encrypted "
        "(storage.encryption_key_file is not set): anyone who can read that container can use the app's access "
        "tokens until they expire\n"
        "    fix: generate a key with `openssl rand -base64 32 > cache-key`, give every replica the same file as "
        "storage.encryption_key_file, and restart them (README: Encrypting the token cache)\n"
    ) in text.stderr

    report = _json_report(run_graphsync("check", "--json", "--config", config))
    assert report["ok"] is True
    [warning] = report["warnings"]
    assert warning["name"] == "token cache encryption"
    assert "not encrypted" in warning["detail"] and "storage.encryption_key_file" in warning["fix"]


def test_check_does_not_warn_when_the_token_cache_is_encrypted(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph, tmp_path: Path
) -> None:
    key = tmp_path / "cache-key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    config = _config(graphsync_config, fake_graph, storage={"encryption_key_file": str(key)})
    text = run_graphsync("check", "--config", config)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "encryption" not in text.stderr

    report = _json_report(run_graphsync("check", "--json", "--config", config))
    assert report["ok"] is True and report["warnings"] == []


def test_check_verifies_the_tables_location_is_writable_and_names_the_fix(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_graph: FakeGraph, tmp_path: Path
) -> None:
    jobs = [{**job, "select": ["displayName"]} for job in JOBS]
    tables_on = {"container": "exports", "tables": True}
    result = run_graphsync("check", "--config", _config(graphsync_config, fake_graph, output=tables_on, jobs=jobs))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ tables: az://exports/tables: writable" in result.stdout

    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    not_writable = {"directory": str(blocked / "out"), "tables": True}
    config = graphsync_config(extra={"graph": {"endpoint": fake_graph.base_url}, "jobs": jobs, "output": not_writable})
    result = run_graphsync("check", "--json", "--config", str(config))
    assert result.returncode == 1
    [tables] = [c for c in _json_report(result)["checks"] if c["name"] == "tables"]
    assert not tables["ok"] and tables["detail"]
    assert tables["fix"] == f"make {blocked / 'out'}/tables a directory the user graphsync runs as can create files in"
