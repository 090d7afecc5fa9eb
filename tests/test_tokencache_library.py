"""The fleet cache as a library: plain ``msal.ConfidentialClientApplication`` objects with ``BlobTokenCache``.

No graphsync code runs here besides the cache: MSAL itself calls it, against real Azurite and the fake Entra over
HTTPS, in real processes where the claim is about processes.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import msal
import pytest
from azure.storage.blob import BlobClient

from graphsync.cache_envelope import CacheEnvelope
from graphsync.tokencache import AT, BlobTokenCache, lock_blob_name
from tests.conftest import REPO_ROOT
from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
from tests.msal_app import SCOPES, application, fingerprint, storage_client

if TYPE_CHECKING:
    from tests.conftest import Azurite, RunGraphsync, WriteConfig

TENANT = "contoso.onmicrosoft.com"
BLOB = "tokens/my-service.json"
DAEMON_BLOB = f"token-cache/{CLIENT_ID}/{TENANT}.json"  # where `graphsync` keeps this client's tenant


def _cache(azurite: Azurite, container: str, blob: str = BLOB, **options: Any) -> BlobTokenCache:
    return BlobTokenCache(storage_client(azurite.connection_string, container, blob), **options)


def _blob_state(azurite: Azurite, container: str, blob: str = BLOB, keys: list[bytes] | None = None) -> dict:
    data = storage_client(azurite.connection_string, container, blob).download_blob().readall()
    return CacheEnvelope(keys or []).decode(data, blob)


def _secrets(state: dict) -> set[str]:
    return {entry["secret"] for entry in state.get(AT, {}).values()}


def _token(app: msal.ConfidentialClientApplication, scopes: list[str] = SCOPES) -> dict[str, Any]:
    result = app.acquire_token_for_client(scopes)
    assert "access_token" in result, result
    return result


# -- processes ---------------------------------------------------------------------------------------------


def test_ten_processes_looping_over_three_lifetimes_cost_one_request_per_lifetime(
    azurite: Azurite, blob_container: str, fake_entra: FakeEntra, tls_env: dict[str, str]
) -> None:
    usable = 10  # MSAL treats the last 300 s as expired
    fake_entra.expires_in = 300 + usable
    duration = 3 * usable + 1
    command = [
        sys.executable,
        "-m",
        "tests.msal_app",
        "--authority",
        f"{fake_entra.authority_host}/{TENANT}",
        "--container",
        blob_container,
        "--blob",
        BLOB,
        "--duration",
        str(duration),
    ]
    env = os.environ | tls_env | {"STORAGE_CONNECTION_STRING": azurite.connection_string}
    apps = [
        subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(10)
    ]
    acquisitions = []
    for app in apps:
        stdout, stderr = app.communicate(timeout=duration + 60)
        assert app.returncode == 0, stderr
        acquisitions += [json.loads(line) for line in stdout.splitlines()]
    requests = [r for r in fake_entra.token_requests() if r.status == 200]
    span = max(a["time"] for a in acquisitions) - min(a["time"] for a in acquisitions)
    lifetimes = math.ceil(span / usable)
    assert len(acquisitions) > 10 * duration, "every process kept getting tokens"
    assert all(a["expires_on"] - a["time"] > 299 for a in acquisitions), "a token past MSAL's margin was used"
    assert lifetimes >= 3 and len(requests) <= 1.1 * lifetimes, (lifetimes, [round(r.time, 1) for r in requests])
    from_idp = [a for a in acquisitions if a["source"] == "identity_provider"]
    assert len(from_idp) == len(requests), "each request answered exactly one acquisition"
    assert len({a["token"] for a in acquisitions}) == len(requests), "every process used the fleet's tokens"


def test_a_library_app_and_the_daemon_share_one_token_both_ways(
    graphsync_config: WriteConfig,
    run_graphsync: RunGraphsync,
    azurite: Azurite,
    blob_container: str,
    fake_entra: FakeEntra,
) -> None:
    config = graphsync_config()
    daemon_first = run_graphsync("token", "--json", "--config", str(config))
    assert daemon_first.returncode == 0, daemon_first.stderr
    app = application(f"{fake_entra.authority_host}/{TENANT}", _cache(azurite, blob_container, DAEMON_BLOB))
    result = _token(app)
    assert result["token_source"] == "cache"
    assert len(fake_entra.token_requests()) == 1, "the app used the daemon's token"

    storage_client(azurite.connection_string, blob_container, DAEMON_BLOB).delete_blob()
    fake_entra.expires_in = 3000  # a different token, so the daemon's answer says whose it is
    app = application(f"{fake_entra.authority_host}/{TENANT}", _cache(azurite, blob_container, DAEMON_BLOB))
    mine = _token(app)
    assert mine["token_source"] == "identity_provider"
    daemon_second = run_graphsync("token", "--json", "--config", str(config))
    report = json.loads(daemon_second.stdout.strip().splitlines()[-1])
    assert report["source"] == "blob"
    assert abs(report["expires_on"] - (time.time() + 3000)) < 30, "the daemon handed out the library's token"
    assert len(fake_entra.token_requests()) == 2


def test_the_example_services_workers_share_one_token(
    azurite: Azurite, blob_container: str, fake_entra: FakeEntra, tls_env: dict[str, str]
) -> None:
    env = os.environ | tls_env
    env |= {
        "TENANT_ID": TENANT,
        "CLIENT_ID": CLIENT_ID,
        "CLIENT_SECRET": CLIENT_SECRET,
        "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string,
        "TOKEN_CACHE_CONTAINER": blob_container,
        "AUTHORITY_HOST": fake_entra.authority_host,
        "WORKERS": "3",
        "SECONDS": "3",
        "INTERVAL": "0.5",
    }
    service = subprocess.run(
        [sys.executable, "examples/fleet_token_service.py"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert service.returncode == 0, service.stderr
    lines = service.stdout.splitlines()
    assert len(lines) >= 3 * 5 and all(" token from " in line for line in lines), service.stdout
    assert sum("from identity_provider" in line for line in lines) == 1
    assert len(fake_entra.token_requests()) == 1
    assert _secrets(_blob_state(azurite, blob_container, DAEMON_BLOB)), "the default blob is the daemon's"


# -- one process -------------------------------------------------------------------------------------------


def test_threads_of_one_process_missing_together_cost_one_request(
    azurite: Azurite, blob_container: str, fake_entra: FakeEntra
) -> None:
    fake_entra.latency_seconds = 0.5  # the first caller is still at the identity provider while the others arrive
    app = application(f"{fake_entra.authority_host}/{TENANT}", _cache(azurite, blob_container))
    start = threading.Barrier(8)
    results: list[dict[str, Any]] = []

    def caller() -> None:
        start.wait()
        results.append(_token(app))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 8
    assert len(fake_entra.token_requests()) == 1
    assert len({r["access_token"] for r in results}) == 1
    assert sorted(r["token_source"] for r in results) == ["cache"] * 7 + ["identity_provider"]


def test_two_apps_with_different_scopes_in_one_blob_keep_both_tokens_through_a_write_conflict(
    azurite: Azurite, blob_container: str, fake_entra: FakeEntra, caplog: pytest.LogCaptureFixture
) -> None:
    """App B reads the (absent) blob, then spends a second at the identity provider; meanwhile app A, which does
    not wait for B's lease, writes first. B's create-only write then fails, and B must merge, not overwrite."""
    fake_entra.latency_seconds = 1.0
    authority = f"{fake_entra.authority_host}/{TENANT}"
    scopes = {"a": ["api://resource-a/.default"], "b": ["api://resource-b/.default"]}
    apps = {name: application(authority, _cache(azurite, blob_container, lock_wait=0.01)) for name in scopes}
    results: dict[str, dict[str, Any]] = {}

    def acquire(name: str) -> None:
        results[name] = _token(apps[name], scopes[name])

    caplog.set_level(logging.DEBUG, logger="graphsync.tokencache")
    second = threading.Thread(target=acquire, args=("b",))
    second.start()
    time.sleep(0.3)
    acquire("a")
    second.join(timeout=30)
    assert {r["token_source"] for r in results.values()} == {"identity_provider"}
    assert any("storage write: conflict" in r.getMessage() for r in caplog.records), "the writes did not conflict"
    assert _secrets(_blob_state(azurite, blob_container)) == {r["access_token"] for r in results.values()}
    fresh = application(authority, _cache(azurite, blob_container))
    for name in scopes:
        again = _token(fresh, scopes[name])
        assert (again["token_source"], again["access_token"]) == ("cache", results[name]["access_token"])


def test_tokens_keep_coming_while_azurite_is_down_and_the_blob_is_written_when_it_returns(
    azurite: Azurite, blob_container: str, fake_entra: FakeEntra, caplog: pytest.LogCaptureFixture
) -> None:
    fake_entra.expires_in = 303  # 3 s usable: several refreshes happen during the outage
    app = application(f"{fake_entra.authority_host}/{TENANT}", _cache(azurite, blob_container))
    assert _token(app)["token_source"] == "identity_provider"
    caplog.set_level(logging.WARNING, logger="graphsync")
    azurite.stop()
    try:
        started, seen = time.monotonic(), set()
        while time.monotonic() - started < 8:
            seen.add(_token(app)["access_token"])
            time.sleep(0.2)
        assert len(seen) >= 2, "tokens should have been refreshed from the identity provider"
        outages = [r for r in caplog.records if "storage unavailable" in r.getMessage()]
        assert len(outages) == 1 and BLOB in outages[0].getMessage(), "one clear warning per outage"
    finally:
        azurite.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        latest = _token(app)["access_token"]
        if latest in _secrets(_blob_state(azurite, blob_container)):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the cache blob was not written again after storage came back")
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_corrupted_blob_is_replaced(
    azurite: Azurite, blob_container: str, fake_entra: FakeEntra, caplog: pytest.LogCaptureFixture
) -> None:
    storage_client(azurite.connection_string, blob_container, BLOB).upload_blob(b'{"format": "graphsync-tok')
    app = application(f"{fake_entra.authority_host}/{TENANT}", _cache(azurite, blob_container))
    with caplog.at_level(logging.WARNING, logger="graphsync"):
        result = _token(app)
    assert result["token_source"] == "identity_provider"
    assert any("unreadable" in r.getMessage() and BLOB in r.getMessage() for r in caplog.records)
    assert _secrets(_blob_state(azurite, blob_container)) == {result["access_token"]}


def test_a_wrong_encryption_key_is_logged_without_secrets_and_tokens_keep_coming(
    azurite: Azurite, blob_container: str, fake_entra: FakeEntra, caplog: pytest.LogCaptureFixture
) -> None:
    authority = f"{fake_entra.authority_host}/{TENANT}"
    theirs, ours = os.urandom(32), os.urandom(32)
    sealed = _token(application(authority, _cache(azurite, blob_container, encryption_key=theirs)))
    raw = storage_client(azurite.connection_string, blob_container, BLOB).download_blob().readall()
    assert sealed["access_token"].encode() not in raw, "the blob should be encrypted"
    caplog.set_level(logging.DEBUG, logger="graphsync")
    app = application(authority, _cache(azurite, blob_container, encryption_key=ours))
    result = _token(app)
    assert result["token_source"] == "identity_provider"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("not among the configured keys" in w for w in warnings), warnings
    logged = "".join(r.getMessage() for r in caplog.records)
    for secret in (sealed["access_token"], result["access_token"], base64.b64encode(ours).decode(), ours.hex()):
        assert secret not in logged
    assert _secrets(_blob_state(azurite, blob_container, keys=[ours])) == {result["access_token"]}
    assert _token(app)["token_source"] == "cache"


def test_a_plain_msal_cache_reads_the_unencrypted_blob(
    azurite: Azurite, blob_container: str, fake_entra: FakeEntra
) -> None:
    authority = f"{fake_entra.authority_host}/{TENANT}"
    issued = _token(application(authority, _cache(azurite, blob_container)))
    plain = msal.SerializableTokenCache()
    plain.deserialize(json.dumps(_blob_state(azurite, blob_container)))
    result = _token(application(authority, plain))
    assert (result["token_source"], result["access_token"]) == ("cache", issued["access_token"])
    assert fingerprint(result["access_token"]) == fingerprint(issued["access_token"])


# -- import cost -------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_importing_the_library_loads_none_of_the_daemon() -> None:
    probe = "import json, sys, graphsync.tokencache; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert {"msal", "azure", "cryptography"} <= loaded
    daemon_only = {"apscheduler", "pydantic", "pydantic_settings", "rich", "deltalake", "prometheus_client"}
    assert not loaded & daemon_only
    assert not {"graphsync.config", "graphsync.metrics", "graphsync.identity"} & set(json.loads(result.stdout))


def test_the_lock_blob_sits_beside_the_cache_blob_where_the_daemon_puts_it() -> None:
    assert lock_blob_name(DAEMON_BLOB) == f"token-cache/{CLIENT_ID}/{TENANT}.lock"
    assert lock_blob_name("tokens/app") == "tokens/app.lock"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"encryption_key": b"short"}, "must be 32 bytes"),
        ({"previous_encryption_keys": [os.urandom(32)]}, "needs encryption_key"),
        ({"lease_seconds": 5}, "lease_seconds must be between 15 and 60"),
    ],
)
def test_bad_options_are_refused_naming_the_parameter(options: dict[str, Any], message: str) -> None:
    unreachable = BlobClient.from_blob_url("http://127.0.0.1:9/devstoreaccount1/tokens/app.json")
    with pytest.raises(ValueError, match=message):
        BlobTokenCache(unreachable, **options)
