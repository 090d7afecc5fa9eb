"""The token cache's logic on a fake clock, an in-memory store and a fake identity provider: milliseconds a test.

tests/test_tokencache.py proves the same behaviour end to end (Azurite, a fake Entra over HTTPS, real processes);
here each rule is pinned down deterministically: no real sleeping, and threads only where threads are the point.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import msal
import pytest

from graphsync.cache_envelope import CacheEnvelope
from graphsync.identity import TokenError
from graphsync.storage import BlobStore
from graphsync.tokencache import AT, AccessToken, Backoff, CacheStore, Clocks, TenantTokenCache
from tests.memory_store import MemoryStore

TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SCOPES = ["https://graph.microsoft.com/.default"]
BLOB = f"token-cache/{CLIENT_ID}/{TENANT}.json"
LOCK = f"token-cache/{CLIENT_ID}/{TENANT}.lock"
TOKEN_ENDPOINT = f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"
ENVELOPE = CacheEnvelope([])


class FakeTime:
    """Wall and monotonic clocks that move only when slept on or advanced; jitter is always the midpoint.

    The wall clock starts in 2023, far behind the real one: a token checked against real time anywhere in the cache
    would look expired, so these tests also prove no code path reads the real clock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wall = 1_700_000_000.0
        self._monotonic = 1_000.0
        self.slept: list[float] = []
        self.after_sleep: Callable[[], None] | None = None

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._wall += seconds
            self._monotonic += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        if self.after_sleep is not None:
            self.after_sleep()

    @staticmethod
    def uniform(low: float, high: float) -> float:
        return (low + high) / 2

    def clocks(self) -> Clocks:
        return Clocks(wall=self.wall, monotonic=self.monotonic, sleep=self.sleep, uniform=self.uniform)


class FakeIdentityProvider:
    """Stands in for Entra behind MSAL: hands out applications that behave like ``ConfidentialClientApplication``.

    Like MSAL's ``acquire_token_for_client`` an application first looks in the cache it was given (tokens with
    under five minutes left count as expired, a passed ``refresh_on`` triggers a refresh), and only on a miss asks
    the identity provider, storing the answer with ``SerializableTokenCache.add`` as MSAL does.
    """

    def __init__(self, time: FakeTime, *, expires_in: int = 3600) -> None:
        self._time = time
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        self.expires_in = expires_in
        self.latency = 0.0  # real seconds per request: lets concurrent callers pile up (thread tests only)
        self.requests = 0
        self.failures_left = 0

    def application(self, cache: msal.SerializableTokenCache) -> FakeApplication:
        return FakeApplication(self, cache)

    def fail_next(self, count: int) -> None:
        self.failures_left = count

    def token_request(self) -> dict[str, Any]:
        time.sleep(self.latency)
        with self._lock:
            self.requests += 1
            if self.failures_left:
                self.failures_left -= 1
                return {
                    "error": "invalid_request",
                    "error_description": "AADSTS90002: Tenant 'contoso.onmicrosoft.com' not found.\r\nTrace ID: x",
                    "error_codes": [90002],
                }
            return {
                "access_token": f"token-{next(self._serial)}",
                "token_type": "Bearer",
                "expires_in": self.expires_in,
            }


class FakeApplication:
    def __init__(self, provider: FakeIdentityProvider, cache: msal.SerializableTokenCache) -> None:
        self._provider = provider
        self._cache = cache

    def acquire_token_for_client(self, scopes: list[str]) -> dict[str, Any]:
        now = self._provider._time.wall()
        aging = None
        for entry in self._cache.search(AT, target=scopes, query={"client_id": CLIENT_ID}, now=now):
            if int(entry["expires_on"]) - now < 300:
                continue
            found = {"access_token": entry["secret"], "expires_in": int(entry["expires_on"]) - int(now)}
            if "refresh_on" in entry and int(entry["refresh_on"]) < now:
                aging = found
                break
            return found | {"token_source": "cache"}
        response = self._provider.token_request()
        if "access_token" not in response:
            return aging | {"token_source": "cache"} if aging else response
        add_token(self._cache, response, scopes, now)
        return response | {"token_source": "identity_provider"}


def add_token(cache: msal.SerializableTokenCache, response: dict[str, Any], scopes: list[str], now: float) -> None:
    """Store a token response the way MSAL's client-credentials flow does."""
    event = {"client_id": CLIENT_ID, "scope": scopes, "token_endpoint": TOKEN_ENDPOINT, "response": response}
    cache.add(event, now=int(now))


def other_writers_blob(time: FakeTime, *tokens: tuple[str, int, list[str]]) -> bytes:
    """The blob another replica would write, holding ``(secret, expires_in, scopes)`` tokens issued now."""
    cache = msal.SerializableTokenCache()
    for secret, expires_in, scopes in tokens:
        add_token(cache, {"access_token": secret, "expires_in": expires_in}, scopes, time.wall())
    return ENVELOPE.encode(json.loads(cache.serialize()), BLOB)


def stored_tokens(store: MemoryStore) -> dict[str, int]:
    """Secret -> expiry of every access token in the cache blob."""
    data = store.get(BLOB)
    assert data is not None, "the cache blob should exist"
    return {e["secret"]: int(e["expires_on"]) for e in (ENVELOPE.decode(data, BLOB).get(AT) or {}).values()}


class Harness:
    """One replica's cache over a shared fake world; background write-backs are collected, run by the test."""

    def __init__(self) -> None:
        self.time = FakeTime()
        self.store = MemoryStore(monotonic=self.time.monotonic, wall=self.time.wall)
        self.idp = FakeIdentityProvider(self.time)
        self.write_backs: list[Callable[[], None]] = []
        self.cache = self.replica()

    def replica(self) -> TenantTokenCache:
        return TenantTokenCache(
            tenant=TENANT,
            client_id=CLIENT_ID,
            scopes=SCOPES,
            store=self.store,
            envelope=ENVELOPE,
            application_factory=self.idp.application,
            clocks=self.time.clocks(),
            start_thread=lambda target, name: self.write_backs.append(target),
        )

    def acquire(self, **kwargs: Any) -> AccessToken:
        return self.cache.acquire(**kwargs)


@pytest.fixture
def world() -> Harness:
    return Harness()


# -- single flight ------------------------------------------------------------------------------------------


def test_ten_threads_missing_at_once_cost_one_identity_provider_call(world: Harness) -> None:
    world.idp.latency = 0.05  # the first caller is still at the identity provider while the others arrive
    start = threading.Barrier(10)
    tokens: list[AccessToken] = []

    def caller() -> None:
        start.wait()
        tokens.append(world.acquire())

    threads = [threading.Thread(target=caller) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert world.idp.requests == 1
    assert len({token.token for token in tokens}) == 1
    assert sorted(token.source for token in tokens) == ["identity_provider"] + ["memory"] * 9
    assert stored_tokens(world.store) == {tokens[0].token: tokens[0].expires_on}


def test_a_replica_that_finds_the_lease_held_takes_the_holders_token_from_the_blob(world: Harness) -> None:
    assert world.store.try_lease(LOCK, 15) is not None  # another replica is refreshing
    world.time.after_sleep = lambda: world.store.put(BLOB, other_writers_blob(world.time, ("theirs", 3600, SCOPES)))
    token = world.acquire()
    assert (token.token, token.source) == ("theirs", "blob")
    assert world.idp.requests == 0


def test_a_replica_waits_at_most_lock_wait_for_a_silent_lease_holder_then_asks_itself(world: Harness) -> None:
    assert world.store.try_lease(LOCK, 60) is not None  # held, and nothing is ever published
    token = world.acquire()
    assert token.source == "identity_provider"
    assert world.idp.requests == 1
    assert 20 <= sum(world.time.slept) < 22  # lock_wait_seconds, polled in steps of at most two seconds


def test_a_valid_token_in_memory_costs_no_storage_io(world: Harness) -> None:
    first = world.acquire()
    before = world.store.operations
    for _ in range(50):
        world.time.advance(60)  # 50 minutes: the token (one hour) stays outside MSAL's five-minute margin
        assert world.acquire() == AccessToken(first.token, first.expires_on, "memory", TENANT)
    assert world.store.operations == before
    assert world.idp.requests == 1


# -- conflicts ----------------------------------------------------------------------------------------------


def test_a_412_on_write_is_merged_and_retried_keeping_both_writers_tokens(world: Harness) -> None:
    other_scopes = ["https://management.azure.com/.default"]  # another partition entry: both must survive
    world.store.before_next_write(
        lambda: world.store.put(BLOB, other_writers_blob(world.time, ("theirs", 3600, other_scopes)))
    )
    ours = world.acquire()
    assert set(stored_tokens(world.store)) == {ours.token, "theirs"}
    assert world.store.writes == 2  # the conflicting write, then the merged one


def test_a_412_from_a_writer_with_a_later_token_leaves_its_token_in_the_blob(world: Harness) -> None:
    world.store.before_next_write(
        lambda: world.store.put(BLOB, other_writers_blob(world.time, ("newer", 3600 + 600, SCOPES)))
    )
    ours = world.acquire()
    assert ours.source == "identity_provider"
    assert stored_tokens(world.store) == {"newer": int(world.time.wall()) + 3600 + 600}
    assert world.store.writes == 1, "the merged state added nothing, so nothing more was written"
    assert world.acquire().token == "newer"  # memory took the later-expiring token too


def test_a_corrupt_blob_is_replaced_by_a_valid_one(world: Harness, caplog: pytest.LogCaptureFixture) -> None:
    world.store.put(BLOB, b'{"format": "graphsync-token-cache", "version": 1, "cache": {"AccessToken": [')
    with caplog.at_level(logging.WARNING):
        token = world.acquire()
    assert token.source == "identity_provider"
    assert stored_tokens(world.store) == {token.token: token.expires_on}
    assert any("is unreadable" in record.getMessage() for record in caplog.records)


# -- outages and backoff ------------------------------------------------------------------------------------


def test_storage_down_tokens_still_served_and_the_cache_written_back_once_it_answers(world: Harness) -> None:
    world.store.down = True
    first = world.acquire()
    assert first.source == "identity_provider"
    assert world.acquire().source == "memory"
    assert world.store.get(BLOB) is None
    assert len(world.write_backs) == 1, "one background write-back, scheduled once"

    def storage_returns_after_three_waits() -> None:
        world.store.down = len(world.time.slept) < 3

    world.time.after_sleep = storage_returns_after_three_waits
    world.write_backs[0]()  # runs until the write lands
    assert world.time.slept == [1.0, 2.0, 4.0]  # the storage backoff, doubling between attempts
    assert stored_tokens(world.store) == {first.token: first.expires_on}
    assert world.idp.requests == 1


def test_storage_is_not_asked_again_until_its_backoff_ends(world: Harness) -> None:
    world.store.down = True
    token = world.acquire()
    assert world.store.reads == 1  # failed: next attempt in 1 s

    def miss() -> None:  # a refused token forces a miss in memory, so only the backoff keeps storage out of it
        nonlocal token
        token = world.acquire(rejected=token.token)

    world.time.advance(0.9)
    miss()
    assert world.store.reads == 1
    world.time.advance(0.2)
    miss()
    assert world.store.reads == 2  # failed again: next attempt in 2 s
    world.time.advance(1.9)
    miss()
    assert world.store.reads == 2
    world.time.advance(0.2)
    miss()
    assert world.store.reads == 3
    assert world.idp.requests == 5, "every miss was served by the identity provider meanwhile"


def test_a_failing_identity_provider_is_not_asked_again_until_its_backoff_ends(world: Harness) -> None:
    world.idp.fail_next(10)
    with pytest.raises(TokenError) as first:
        world.acquire()
    assert first.value.aadsts == "AADSTS90002"
    for wait, requests in ((0, 1), (1.9, 1), (0.2, 2), (3.9, 2), (0.2, 3)):  # 2 s, then 4 s
        world.time.advance(wait)
        with pytest.raises(TokenError):
            world.acquire()
        assert world.idp.requests == requests, f"after {wait} s more"


def test_a_failing_identity_provider_is_covered_by_the_cached_token_while_it_works(world: Harness) -> None:
    world.idp.expires_in = 330  # usable for 30 s under MSAL's five-minute margin, then a fallback for 300 s more
    first = world.acquire()
    world.idp.fail_next(10)
    world.time.advance(60)
    kept = world.acquire()
    assert (kept.token, kept.source) == (first.token, "memory")
    world.time.advance(1)
    assert world.acquire().token == first.token
    assert world.idp.requests == 2, "the backoff keeps the second miss away from the identity provider"


@pytest.mark.parametrize(("initial", "maximum"), [(1.0, 60.0), (2.0, 60.0)], ids=["storage", "identity"])
def test_backoff_starts_at_its_initial_delay_doubles_and_stops_at_its_cap(initial: float, maximum: float) -> None:
    time = FakeTime()
    backoff = Backoff(initial=initial, maximum=maximum, monotonic=time.monotonic)
    assert backoff.ready()
    waits = []
    for _ in range(10):
        backoff.failed()
        waits.append(backoff.remaining())
        assert not backoff.ready()
    assert waits == [min(initial * 2**n, maximum) for n in range(10)]
    time.advance(waits[-1])
    assert backoff.ready()
    backoff.succeeded()
    backoff.failed()
    assert backoff.remaining() == initial


def test_backoff_jitter_spreads_a_wait_by_at_most_its_fraction() -> None:
    time = FakeTime()
    draws: list[tuple[float, float]] = []

    def highest(low: float, high: float) -> float:
        draws.append((low, high))
        return high

    backoff = Backoff(initial=1.0, maximum=60.0, monotonic=time.monotonic, jitter=0.2, uniform=highest)
    backoff.failed()
    assert draws == [(0.8, 1.2)]
    assert backoff.remaining() == pytest.approx(1.2)


# -- interfaces ---------------------------------------------------------------------------------------------


def test_the_blob_store_and_the_memory_store_both_satisfy_the_cache_store_protocol(world: Harness) -> None:
    assert isinstance(BlobStore(SimpleNamespace(container_name="tokens")), CacheStore)
    assert isinstance(world.store, CacheStore)


def test_a_token_error_built_from_an_msal_result_names_the_tenant_and_the_aadsts_code() -> None:
    error = TokenError.from_result(
        TENANT, {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret.\r\nTrace"}
    )
    assert (error.tenant, error.error, error.aadsts) == (TENANT, "invalid_client", "AADSTS7000215")
    assert (
        str(error) == f"token request for tenant {TENANT} failed: invalid_client: AADSTS7000215: Invalid client secret."
    )
