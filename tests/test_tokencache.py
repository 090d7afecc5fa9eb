"""The shared token cache against real Azurite, a local HTTPS fake of Entra, and real separate processes."""

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
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme
from azure.storage.blob import BlobServiceClient
from prometheus_client import REGISTRY

from graphsync.cache_envelope import CacheEnvelope
from graphsync.config import load_settings
from graphsync.identity import TokenError
from graphsync.storage import BlobContent, BlobStore
from graphsync.tokencache import AT, TokenCaches
from tests.conftest import REPO_ROOT
from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra

if TYPE_CHECKING:
    from tests.conftest import Azurite, RunGraphsync, StartGraphsync, WriteConfig

TENANT = "contoso.onmicrosoft.com"
BLOB = f"token-cache/{CLIENT_ID}/{TENANT}.json"


def _report(process_output: str) -> dict:
    """The JSON object `graphsync token --json` ends its stdout with."""
    return json.loads(process_output.strip().splitlines()[-1])


def _store(config: Path) -> BlobStore:
    return BlobStore.from_settings(load_settings(config).storage)


def _blob_tokens(config: Path) -> dict[str, dict]:
    """The access-token entries in the partition blob, decoded with the configuration's keys."""
    settings = load_settings(config)
    content = BlobStore.from_settings(settings.storage).read(BLOB)
    assert isinstance(content, BlobContent), "the cache blob should exist"
    state = CacheEnvelope(settings.storage.encryption_keys).decode(content.data, BLOB)
    return state.get(AT, {})


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _caches(config: Path) -> TokenCaches:
    settings = load_settings(config)
    return TokenCaches.from_settings(settings, BlobStore.from_settings(settings.storage))


MSAL_MARGIN = 300  # MSAL treats a token with less than five minutes left as expired


def _kept_the_margin(source: str, expires_on: float, asked: float, usable: float) -> bool:
    """Whether a token handed out had the time left that acquire() promises, measured from just before the call.

    The promise holds at an instant inside acquire(), so ``expires_on - asked`` is a bound no loaded machine can
    break, where a clock read after the call is not. The promise: MSAL's margin, except that a token from memory
    may be inside it while another caller refreshes (acquire never waits while a working token is in memory), which
    lasts one refresh: never a whole usable lifetime.
    """
    left = expires_on - asked
    return left >= MSAL_MARGIN or (source == "memory" and left > MSAL_MARGIN - usable)


# -- 1. two processes in a row -----------------------------------------------------------------------------


def test_second_process_gets_its_token_from_the_blob(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_entra: FakeEntra
) -> None:
    config = graphsync_config()
    first = run_graphsync("token", "--json", "--config", str(config))
    second = run_graphsync("--config", str(config), "token", "--tenant", TENANT, "--json")
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert _report(first.stdout)["source"] == "identity_provider"
    assert _report(second.stdout) == {
        "tenant": TENANT,
        "source": "blob",
        "expires_on": _report(first.stdout)["expires_on"],
    }
    assert len(fake_entra.token_requests()) == 1
    assert fake_entra.discovery_requests() == 1, "the second process should not even build an MSAL client"


def test_access_token_prints_the_shared_token_for_scripts_and_nothing_else(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_entra: FakeEntra
) -> None:
    """`curl -H "Authorization: Bearer $(graphsync token --access-token)"`: stdout is the token alone, a valid one
    from the shared blob (no second identity-provider request), and stderr never holds it."""
    config = str(graphsync_config())
    first = run_graphsync("token", "--json", "--access-token", "--config", config)
    second = run_graphsync("token", "--access-token", "--config", config)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    issued = fake_entra.token_requests()
    assert len(issued) == 1 and issued[0].access_token is not None
    assert _report(first.stdout)["access_token"] == issued[0].access_token
    assert second.stdout == issued[0].access_token + "\n"
    assert fake_entra.is_valid(second.stdout.strip())
    assert issued[0].access_token not in first.stderr + second.stderr
    plain = run_graphsync("token", "--json", "--config", config)
    assert "access_token" not in _report(plain.stdout) and issued[0].access_token not in plain.stdout


# -- 2. ten processes at once ------------------------------------------------------------------------------


def test_ten_processes_started_at_once_cost_one_token_request(
    graphsync_config: WriteConfig, start_graphsync: StartGraphsync, fake_entra: FakeEntra
) -> None:
    fake_entra.latency_seconds = 0.5  # a realistic token round trip keeps the lease holder busy for a while
    config = graphsync_config()
    processes = [start_graphsync("token", "--json", "--config", str(config)) for _ in range(10)]
    reports = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=90)
        assert process.returncode == 0, stderr
        reports.append(_report(stdout))
    now = time.time()
    assert all(report["expires_on"] - now > 300 for report in reports)
    requests = fake_entra.token_requests()
    assert 1 <= len(requests) <= 2, [r.time for r in requests]
    sources = [report["source"] for report in reports]
    assert sources.count("identity_provider") == len(requests)
    assert sources.count("blob") == 10 - len(requests)


# -- 3. short lifetimes, five long-running replicas --------------------------------------------------------


def test_five_replicas_over_three_lifetimes_ask_about_once_per_lifetime(
    graphsync_config: WriteConfig, tls_env: dict[str, str], fake_entra: FakeEntra
) -> None:
    usable = 8  # MSAL treats the last 300 s as expired: expires_in = 308 leaves 8 s of use
    fake_entra.expires_in = MSAL_MARGIN + usable
    config = graphsync_config()
    duration = 3 * usable + 2
    env = os.environ | tls_env
    command = [
        sys.executable,
        "-m",
        "tests.replica",
        "--config",
        str(config),
        "--duration",
        str(duration),
        "--interval",
        "0.2",
    ]
    replicas = [
        subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(5)
    ]
    acquisitions = []
    for replica in replicas:
        stdout, stderr = replica.communicate(timeout=duration + 60)
        assert replica.returncode == 0, stderr
        acquisitions += [json.loads(line) for line in stdout.splitlines()]
    requests = fake_entra.token_requests()
    # The lifetimes the fleet lived through, from its first acquisition to its last: on a loaded machine the
    # replicas start seconds apart, so this window, not ``duration``, is what the request count follows.
    window = max(a["time"] for a in acquisitions) - min(a["asked"] for a in acquisitions)
    lifetimes = math.ceil(window / usable)
    assert len(acquisitions) > 5 * duration  # every replica kept getting tokens
    assert all(_kept_the_margin(a["source"], a["expires_on"], a["asked"], usable) for a in acquisitions), (
        "a token past MSAL's margin was used"
    )
    assert lifetimes - 1 <= len(requests) <= lifetimes + 1, (window, [round(r.time, 1) for r in requests])
    from_idp = [a for a in acquisitions if a["source"] == "identity_provider"]
    assert len(from_idp) == len(requests)
    assert sum(a["source"] == "blob" for a in acquisitions) >= 4 * (len(requests) - 1)


# -- 4. racing writers -------------------------------------------------------------------------------------


def test_racing_writers_lose_no_update_and_keep_the_blob_valid(
    graphsync_config: WriteConfig, fake_entra: FakeEntra
) -> None:
    """Eight replicas (own memory, own storage client) refresh at the same moment, each for its own scope, and
    none waits for the lease: every write races. Every token must survive in the blob."""
    config = graphsync_config(extra={"cache": {"lock_wait_seconds": 0.001}})
    settings = load_settings(config)
    writers = []
    for i in range(8):
        scoped = settings.model_copy(deep=True)
        scoped.identity.scopes = [f"api://resource-{i}/.default"]
        writers.append(TokenCaches.from_settings(scoped, BlobStore.from_settings(scoped.storage)))
    store = BlobStore.from_settings(settings.storage)
    store.ensure_container()
    store.write(BLOB.replace(".json", ".lock"), b"", if_match=None)  # so only cache-blob writes can conflict
    conflicts_before = _counter("graphsync_storage_operations_total", operation="write", result="conflict")
    barrier = threading.Barrier(len(writers))
    tokens: dict[int, str] = {}

    def refresh(i: int) -> None:
        barrier.wait()
        tokens[i] = writers[i].acquire(TENANT).token

    threads = [threading.Thread(target=refresh, args=(i,)) for i in range(len(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(tokens) == 8
    stored = {entry["secret"] for entry in _blob_tokens(config).values()}
    assert stored == set(tokens.values()), "a racing write lost another replica's token"
    assert _counter("graphsync_storage_operations_total", operation="write", result="conflict") > conflicts_before, (
        "the writers did not actually race"
    )


def test_a_stale_writer_never_overwrites_a_newer_token(
    graphsync_config: WriteConfig, azurite: Azurite, fake_entra: FakeEntra
) -> None:
    """Replica X gets a token while storage is down; meanwhile Y publishes a later-expiring one. When storage
    comes back X writes conditionally, meets the conflict, merges — and the newer token stays."""
    config = graphsync_config()
    # Y is built up front: its first read must come before X's background write-back retries (1 s, 3 s, 7 s after
    # the outage began) find storage back; building it after the restart widened that race on a loaded machine.
    x, y = _caches(config), _caches(config)
    azurite.stop()
    try:
        fake_entra.expires_in = 1800
        older = x.acquire(TENANT)
        assert older.source == "identity_provider"
    finally:
        azurite.start()
    fake_entra.expires_in = 3600
    newer = y.acquire(TENANT)
    assert newer.source == "identity_provider" and newer.expires_on > older.expires_on

    conflicts = _counter("graphsync_storage_operations_total", operation="write", result="conflict")
    deadline = time.time() + 30
    while time.time() < deadline:  # X's background flush retries once its storage backoff ends
        token = x.acquire(TENANT).token
        assert token in (older.token, newer.token)
        if token == newer.token:
            break
        time.sleep(0.2)
    else:
        pytest.fail("X never merged the newer token: its pending write was not retried, or it overwrote")
    [entry] = _blob_tokens(config).values()
    assert entry["secret"] == newer.token, "the stale writer overwrote a newer token"
    assert _counter("graphsync_storage_operations_total", operation="write", result="conflict") > conflicts


# -- 5. storage outage -------------------------------------------------------------------------------------


def test_tokens_keep_coming_while_azurite_is_down_and_the_cache_is_written_when_it_is_back(
    graphsync_config: WriteConfig, azurite: Azurite, fake_entra: FakeEntra, caplog: pytest.LogCaptureFixture
) -> None:
    usable = 3  # expires_in = 303: several refreshes happen during the outage
    fake_entra.expires_in = MSAL_MARGIN + usable
    config = graphsync_config()
    caches = _caches(config)
    assert caches.acquire(TENANT).source == "identity_provider"
    caplog.set_level(logging.WARNING, logger="graphsync")
    azurite.stop()
    try:
        started = time.time()
        seen = []
        while time.time() - started < 10:
            asked = time.time()
            token = caches.acquire(TENANT)
            assert _kept_the_margin(token.source, token.expires_on, asked, usable), "a token past MSAL's margin"
            seen.append(token.token)
            time.sleep(0.2)
        assert len(set(seen)) >= 2, "tokens should have been refreshed from the identity provider"
        outage_warnings = [r for r in caplog.records if "storage unavailable" in r.getMessage()]
        assert len(outage_warnings) == 1, "one clear warning per outage, not one per call"
        assert BLOB in outage_warnings[0].getMessage()
    finally:
        azurite.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        latest = caches.acquire(TENANT)
        if latest.token in {e["secret"] for e in _blob_tokens(config).values()}:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the cache blob was not written again after storage came back")
    assert any("answers again" in r.getMessage() for r in caplog.records)


# -- 6. corrupted blob, wrong key --------------------------------------------------------------------------


def test_a_corrupted_blob_is_reported_and_repaired(graphsync_config: WriteConfig, run_graphsync: RunGraphsync) -> None:
    config = graphsync_config()
    store = _store(config)
    store.ensure_container()
    store.write(BLOB, b'{"format": "graphsync-token-cache", "version": 1, "cache": [tru', if_match=None)
    result = run_graphsync("token", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert _report(result.stdout)["source"] == "identity_provider"
    assert "unreadable" in result.stderr and BLOB in result.stderr
    assert len(_blob_tokens(config)) == 1, "the next write should have replaced the corrupted blob"


def _key_file(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text(base64.b64encode(os.urandom(32)).decode())
    return path


def test_a_wrong_encryption_key_is_reported_and_the_blob_rewritten_with_ours(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, tmp_path: Path
) -> None:
    old_key, new_key = _key_file(tmp_path, "old.key"), _key_file(tmp_path, "new.key")
    with_old = graphsync_config("old.toml", extra={"storage": {"encryption_key_file": str(old_key)}})
    with_new = graphsync_config("new.toml", extra={"storage": {"encryption_key_file": str(new_key)}})
    rotating = graphsync_config(
        "rotating.toml",
        extra={"storage": {"encryption_key_file": str(new_key), "previous_encryption_key_files": [str(old_key)]}},
    )

    assert _report(run_graphsync("token", "--json", "--config", str(with_old)).stdout)["source"] == "identity_provider"
    assert _report(run_graphsync("token", "--json", "--config", str(rotating)).stdout)["source"] == "blob", (
        "a previous key must still decrypt"
    )
    wrong = run_graphsync("token", "--json", "--config", str(with_new))
    assert wrong.returncode == 0, wrong.stderr
    assert _report(wrong.stdout)["source"] == "identity_provider"
    assert "not among the configured keys" in wrong.stderr and BLOB in wrong.stderr
    assert len(_blob_tokens(with_new)) == 1, "the blob should now be sealed with the new key"


# -- 7. no secrets in debug output -------------------------------------------------------------------------


def test_debug_logging_never_prints_the_client_secret_or_a_token(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_entra: FakeEntra, azurite: Azurite
) -> None:
    config = graphsync_config()
    debug = {"GRAPHSYNC_LOG_LEVEL": "DEBUG"}
    outputs = [run_graphsync("token", "--config", str(config), env=debug) for _ in range(2)]
    fake_entra.fail_next(1, status=401, error="invalid_client", description="AADSTS7000215: Invalid client secret.")
    fake_entra.expires_in = 3600
    other_tenant = graphsync_config("other.toml", tenants=["fabrikam.onmicrosoft.com"])
    outputs.append(run_graphsync("token", "--config", str(other_tenant), env=debug))
    text = "".join(o.stdout + o.stderr for o in outputs)
    assert outputs[0].returncode == 0 and outputs[1].returncode == 0
    assert outputs[2].returncode == 1 and "AADSTS7000215" in outputs[2].stderr
    assert '"level": "DEBUG"' in text, "debug logging was not on, so this test would prove nothing"
    assert CLIENT_SECRET not in text
    issued = [r.access_token for r in fake_entra.token_requests() if r.access_token]
    assert issued and not any(token in text for token in issued)
    assert azurite.connection_string.split("AccountKey=")[1].split(";")[0] not in text


# -- identity-provider errors and proactive refresh ----------------------------------------------------------


def test_identity_provider_errors_are_reported_with_their_aadsts_code(
    graphsync_config: WriteConfig, run_graphsync: RunGraphsync, fake_entra: FakeEntra
) -> None:
    fake_entra.fail_next(
        1, status=401, error="invalid_client", description="AADSTS7000215: Invalid client secret provided."
    )
    result = run_graphsync("token", "--config", str(graphsync_config()))
    assert result.returncode == 1
    assert "invalid_client" in result.stderr and "AADSTS7000215" in result.stderr
    assert "Traceback" not in result.stderr


def test_transient_identity_provider_errors_are_retried(graphsync_config: WriteConfig, fake_entra: FakeEntra) -> None:
    fake_entra.fail_next(2, status=503, error="temporarily_unavailable", description="AADSTS50000: busy")
    token = _caches(graphsync_config()).acquire(TENANT)
    assert token.source == "identity_provider"
    assert [r.status for r in fake_entra.token_requests()] == [503, 503, 200]


def test_proactive_refresh_goes_through_the_shared_cache(
    graphsync_config: WriteConfig, fake_entra: FakeEntra, caplog: pytest.LogCaptureFixture
) -> None:
    fake_entra.refresh_in = 1
    config = graphsync_config()
    a, b = _caches(config), _caches(config)
    first = a.acquire(TENANT)
    time.sleep(1.5)  # past refresh_on, long before expiry
    refreshed = a.acquire(TENANT)
    assert refreshed.source == "identity_provider" and refreshed.token != first.token
    fake_entra.refresh_in = None
    assert b.acquire(TENANT).token == refreshed.token  # the other replica reuses the refreshed token

    fake_entra.refresh_in = 1
    a.acquire(TENANT, rejected=refreshed.token)
    time.sleep(1.5)
    fake_entra.fail_next(5, status=500, error="server_error", description="AADSTS90033: down")
    caplog.set_level(logging.WARNING, logger="graphsync")
    kept = a.acquire(TENANT)
    assert kept.source == "memory", "a failed proactive refresh keeps the still-valid token"
    assert any("using the cached token" in r.getMessage() for r in caplog.records)


def test_a_token_rejected_by_the_resource_is_replaced_once_for_the_fleet(
    graphsync_config: WriteConfig, fake_entra: FakeEntra
) -> None:
    config = graphsync_config()
    a, b = _caches(config), _caches(config)
    rejected = a.acquire(TENANT)
    assert b.acquire(TENANT).token == rejected.token
    fresh = a.acquire(TENANT, rejected=rejected.token)
    assert fresh.source == "identity_provider" and fresh.token != rejected.token
    again = b.acquire(TENANT, rejected=rejected.token)
    assert (again.source, again.token) == ("blob", fresh.token)
    assert len(fake_entra.token_requests()) == 2


def test_a_valid_token_in_memory_costs_no_storage_io(graphsync_config: WriteConfig) -> None:
    caches = _caches(graphsync_config())
    caches.acquire(TENANT)
    before = sum(
        _counter("graphsync_storage_operations_total", operation=op, result=res)
        for op in ("read", "write", "lease")
        for res in ("ok", "not_modified", "absent", "conflict", "lease_held", "error")
    )
    assert {caches.acquire(TENANT).source for _ in range(50)} == {"memory"}
    after = sum(
        _counter("graphsync_storage_operations_total", operation=op, result=res)
        for op in ("read", "write", "lease")
        for res in ("ok", "not_modified", "absent", "conflict", "lease_held", "error")
    )
    assert after == before


# -- 9. certificate and workload-identity credentials -------------------------------------------------------


def test_certificate_credential_reaches_the_token_endpoint_as_a_signed_assertion(
    ca: trustme.CA, graphsync_config: WriteConfig, run_graphsync: RunGraphsync, tmp_path: Path
) -> None:
    leaf = ca.issue_cert("graphsync-client", key_type=trustme.KeyType.RSA)  # Entra ID takes RSA only
    pem = tmp_path / "app.pem"
    pem.write_bytes(leaf.private_key_and_cert_chain_pem.bytes())
    with FakeEntra(ca, client_id=CLIENT_ID, certificate_pem=leaf.cert_chain_pems[0].bytes()) as entra:
        config = graphsync_config(
            extra={
                "identity": {
                    "client_secret": None,
                    "certificate_file": str(pem),
                    "authority_host": entra.authority_host,
                }
            }
        )
        result = run_graphsync("token", "--json", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert [r.auth for r in entra.token_requests()] == ["certificate"]
        assert entra.token_requests()[0].status == 200


def test_federated_token_file_is_read_again_for_every_token_request(
    ca: trustme.CA, graphsync_config: WriteConfig, tls_env: dict[str, str], tmp_path: Path
) -> None:
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("federated-assertion-one\n")
    with FakeEntra(ca, client_id=CLIENT_ID, federated_token="federated-assertion-one") as entra:
        config = graphsync_config(
            extra={
                "identity": {
                    "client_secret": None,
                    "federated_token_file": str(token_file),
                    "authority_host": entra.authority_host,
                }
            }
        )
        caches = _caches(config)
        first = caches.acquire(TENANT)
        token_file.write_text("federated-assertion-two\n")  # the kubelet rotated the projected token
        entra.federated_token = "federated-assertion-two"
        second = caches.acquire(TENANT, rejected=first.token)
        assert second.source == "identity_provider"
        assert [(r.auth, r.status) for r in entra.token_requests()] == [("federated", 200), ("federated", 200)]


# -- a working token is never held hostage ------------------------------------------------------------------


def _lock_is_leased(config: Path) -> bool:
    settings = load_settings(config)
    with BlobServiceClient.from_connection_string(settings.storage.connection_string.get_secret_value()) as service:
        lock = service.get_blob_client(_store(config).container_name, BLOB.replace(".json", ".lock"))
        return lock.exists() and lock.get_blob_properties().lease.state == "leased"


def test_a_replica_with_a_working_token_does_not_wait_for_another_replicas_refresh(
    graphsync_config: WriteConfig, fake_entra: FakeEntra
) -> None:
    fake_entra.refresh_in = 1  # past refresh_on after a second, valid for an hour
    lock_wait = 30  # what waiting for the other replica would cost: far above any scheduling noise
    config = graphsync_config(extra={"cache": {"lock_wait_seconds": lock_wait}})
    a, b = _caches(config), _caches(config)
    held = b.acquire(TENANT)
    time.sleep(1.5)
    lease = _store(config).try_lease(BLOB.replace(".json", ".lock"), 15)  # "another replica" is refreshing
    assert lease is not None
    try:
        started = time.monotonic()
        token = b.acquire(TENANT)
        assert (token.source, token.token) == ("memory", held.token)
        assert time.monotonic() - started < lock_wait / 3, "b waited for the lease instead of using its token"
    finally:
        lease.release()

    own = a.acquire(TENANT)  # a's own token (b's is past its refresh_on, so a refreshes it)
    time.sleep(1.5)  # past its refresh_on
    fake_entra.latency_seconds = 3  # a slow identity provider: one thread refreshes, the others carry on
    requests = len(fake_entra.token_requests())
    refresher = threading.Thread(target=a.acquire, args=(TENANT,))
    started = time.monotonic()
    refresher.start()
    deadline = started + 20
    while not _lock_is_leased(config):  # the refresher holds the lease: it is waiting for the identity provider
        assert time.monotonic() < deadline and refresher.is_alive(), "the refresher never took the lease"
        time.sleep(0.02)
    bystander = a.acquire(TENANT)
    assert refresher.is_alive(), "the bystander should return while the refresh is still waiting (3 s)"
    assert (bystander.source, bystander.token) == ("memory", own.token)
    refresher.join(timeout=30)
    assert time.monotonic() - started >= 3, "the refresh did go to the (slow) identity provider"
    assert len(fake_entra.token_requests()) == requests + 1, "one refresh, no request from the bystander"


def test_a_hung_storage_account_never_stalls_tokens_served_from_memory(
    graphsync_config: WriteConfig, fake_entra: FakeEntra
) -> None:
    import socket

    with socket.socket() as hung:  # accepts connections, never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}/devstoreaccount1"
        config = graphsync_config(
            extra={
                "storage": {
                    "connection_string": f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                    f"AccountKey={base64.b64encode(b'k' * 32).decode()};BlobEndpoint={endpoint};",
                    "timeout_seconds": 2.0,
                }
            }
        )
        caches = _caches(config)
        assert caches.acquire(TENANT).source == "identity_provider"  # pays the storage timeouts once
        latencies = []
        for _ in range(40):
            started = time.monotonic()
            assert caches.acquire(TENANT).source == "memory"
            latencies.append(time.monotonic() - started)
            time.sleep(0.1)
    # A call that waited on the hung account would wait out a storage timeout (2 s); one from memory takes
    # microseconds, and half the timeout is a margin no scheduling hiccup of a loaded machine reaches.
    assert max(latencies) < 1.0, max(latencies)


def test_a_credential_file_gone_during_a_refresh_keeps_the_working_token(
    ca: trustme.CA,
    graphsync_config: WriteConfig,
    tls_env: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("federated-assertion\n")
    with FakeEntra(ca, client_id=CLIENT_ID, federated_token="federated-assertion", refresh_in=1) as entra:
        config = graphsync_config(
            extra={
                "identity": {
                    "client_secret": None,
                    "federated_token_file": str(token_file),
                    "authority_host": entra.authority_host,
                }
            }
        )
        caches = _caches(config)
        first = caches.acquire(TENANT)
        time.sleep(1.5)
        token_file.unlink()  # e.g. the projected volume is being remounted
        caplog.set_level(logging.WARNING, logger="graphsync")
        kept = caches.acquire(TENANT)
        assert (kept.source, kept.token) == ("memory", first.token)
        assert any("credential_unreadable" in r.getMessage() for r in caplog.records)


def test_without_a_working_token_a_failing_identity_provider_is_not_hammered(
    graphsync_config: WriteConfig, fake_entra: FakeEntra
) -> None:
    caches = _caches(graphsync_config())
    fake_entra.fail_next(20, status=400, error="invalid_request", description="AADSTS90002: Tenant not found.")
    with pytest.raises(TokenError) as first:
        caches.acquire(TENANT)
    sent = len(fake_entra.token_requests())
    with pytest.raises(TokenError) as again:
        caches.acquire(TENANT)
    assert again.value is first.value and again.value.aadsts == "AADSTS90002"
    assert len(fake_entra.token_requests()) == sent, "a second request during the backoff"
