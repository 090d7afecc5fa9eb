"""The Graph fake must behave like Graph where graphsync depends on it, or daemon tests prove nothing.

Driven with plain ``requests`` and tokens from the Entra fake, the way any real client would.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import trustme

from tests.fakes import graph as graph_module
from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
from tests.fakes.graph import FakeGraph, mutate, populate

CONTOSO = "contoso.onmicrosoft.com"
FABRIKAM = "fabrikam.onmicrosoft.com"
USER_SELECT = "displayName,mail,jobTitle"

# The fixture the conftest will import; bound here too so this module works on its own.
fake_graph = graph_module.fake_graph


@pytest.fixture(autouse=True)
def trust_ca(ca_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """requests must trust the test CA for both fakes."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_bundle))


def get_token(entra: FakeEntra, tenant: str = CONTOSO) -> str:
    response = requests.post(
        f"{entra.authority_host}/{tenant}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scope": "https://graph.microsoft.com/.default",
        },
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


@dataclass
class Walk:
    """Every page of one round, as a client following the links would see it."""

    pages: list[list[dict[str, Any]]] = field(default_factory=list)
    responses: list[requests.Response] = field(default_factory=list)
    delta_link: str | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        return [record for page in self.pages for record in page]

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record per id (later copies win)."""
        return {record["id"]: record for record in self.records}


class Client:
    def __init__(self, graph: FakeGraph, token: str) -> None:
        self.graph = graph
        self.token = token

    def get(self, url: str, *, minimal: bool = False, **headers: str) -> requests.Response:
        if url.startswith("/"):
            url = self.graph.base_url + url
        sent = {"Authorization": f"Bearer {self.token}", **headers}
        if minimal:
            sent["Prefer"] = "return=minimal"
        return requests.get(url, headers=sent, timeout=30)

    def walk(self, url: str, *, minimal: bool = False, max_pages: int = 10_000) -> Walk:
        walk = Walk()
        for _ in range(max_pages):
            response = self.get(url, minimal=minimal)
            assert response.status_code == 200, response.text
            body = response.json()
            walk.responses.append(response)
            walk.pages.append(body["value"])
            if "@odata.nextLink" in body:
                assert "@odata.deltaLink" not in body
                url = body["@odata.nextLink"]
                continue
            walk.delta_link = body.get("@odata.deltaLink")
            return walk
        raise AssertionError("too many pages")


@pytest.fixture
def graph(fake_graph: FakeGraph) -> FakeGraph:
    return fake_graph


@pytest.fixture
def client(graph: FakeGraph, fake_entra: FakeEntra) -> Client:
    return Client(graph, get_token(fake_entra))


def add_users(graph: FakeGraph, count: int, tenant: str = CONTOSO, prefix: str = "u") -> list[str]:
    ids = [f"{prefix}{n:05d}" for n in range(count)]
    graph.add_many(
        tenant,
        "users",
        [{"id": i, "displayName": f"User {i}", "mail": f"{i}@contoso.com", "jobTitle": "Engineer"} for i in ids],
    )
    return ids


def member_ids(record: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(added, removed) member ids of one group record's members@delta."""
    added = {m["id"] for m in record.get("members@delta", []) if "@removed" not in m}
    removed = {m["id"] for m in record.get("members@delta", []) if "@removed" in m}
    for entry in record.get("members@delta", []):
        assert entry["@odata.type"] == "#microsoft.graph.user"
        if "@removed" in entry:
            assert entry["@removed"] == {"reason": "deleted"}
    return added, removed


# -- listings ------------------------------------------------------------------------------


def test_listing_pages_every_object_once_with_selected_properties(graph: FakeGraph, client: Client) -> None:
    ids = add_users(graph, 250)
    walk = client.walk("/v1.0/users?$select=displayName,mail&$top=60")

    assert [len(page) for page in walk.pages] == [60, 60, 60, 60, 10]
    assert sorted(r["id"] for r in walk.records) == ids
    assert all(set(r) == {"id", "displayName", "mail"} for r in walk.records)
    assert walk.delta_link is None
    next_link = walk.responses[0].json()["@odata.nextLink"]
    assert next_link.startswith(f"{graph.base_url}/v1.0/users?$skiptoken=")


def test_listing_page_size_defaults_to_page_size_and_top_is_capped_at_999(graph: FakeGraph, client: Client) -> None:
    add_users(graph, 1200)
    assert [len(p) for p in client.walk("/v1.0/users").pages] == [100] * 12
    assert [len(p) for p in client.walk("/v1.0/users?$top=5000").pages] == [999, 201]
    graph.page_size = 500
    assert [len(p) for p in client.walk("/v1.0/users").pages] == [500, 500, 200]


def test_without_select_the_whole_object_is_returned(graph: FakeGraph, client: Client) -> None:
    graph.add(CONTOSO, "users", {"id": "a", "displayName": "A", "extra": [1, 2]})
    assert client.walk("/v1.0/users").records == [{"id": "a", "displayName": "A", "extra": [1, 2]}]
    response = client.get("/v1.0/users/a?$select=displayName,missing")
    assert response.json()["displayName"] == "A"
    assert response.json()["missing"] is None
    assert client.get("/v1.0/users/nope").status_code == 404


def test_a_next_link_can_be_fetched_again_after_a_truncated_page(graph: FakeGraph, client: Client) -> None:
    ids = add_users(graph, 30)
    graph.page_size = 10
    first = client.get("/v1.0/users/delta?$select=displayName").json()
    next_link = first["@odata.nextLink"]
    graph.fail_next(1)
    broken = client.get(next_link)
    assert broken.status_code == 200
    with pytest.raises(ValueError):
        broken.json()
    again = client.walk(next_link)
    assert sorted([r["id"] for r in first["value"]] + [r["id"] for r in again.records]) == ids


def test_every_response_carries_graph_diagnostic_headers(graph: FakeGraph, client: Client) -> None:
    correlation = str(uuid.uuid4())
    response = client.get("/v1.0/users", **{"client-request-id": correlation})
    assert response.status_code == 200
    assert response.headers["client-request-id"] == correlation
    assert uuid.UUID(response.headers["request-id"])
    assert "ServerInfo" in json.loads(response.headers["x-ms-ags-diagnostic"])
    assert response.headers["Content-Type"].startswith("application/json")

    error = client.get("/v1.0/users/missing")
    assert error.headers["client-request-id"] == error.headers["request-id"]
    inner = error.json()["error"]["innerError"]
    assert inner["request-id"] == error.headers["request-id"]
    assert "date" in inner


# -- delta ---------------------------------------------------------------------------------


def test_delta_enumerates_everything_then_exactly_the_changes(graph: FakeGraph, client: Client) -> None:
    ids = add_users(graph, 8)
    graph.page_size = 3
    initial = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}&$top=1")  # $top ignored on delta
    assert [len(p) for p in initial.pages] == [3, 3, 2]
    assert sorted(initial.latest()) == ids
    assert all(set(r) == {"id", "displayName", "mail", "jobTitle"} for r in initial.records)
    assert initial.delta_link is not None
    assert initial.delta_link.startswith(f"{graph.base_url}/v1.0/users/delta?$deltatoken=")
    assert initial.responses[0].json()["@odata.nextLink"].startswith(f"{graph.base_url}/v1.0/users/delta?$skiptoken=")

    u0, u1, u2, u3, u4 = ids[:5]
    graph.update(CONTOSO, "users", u0, jobTitle="Director")
    graph.update(CONTOSO, "users", u1, mail=None)
    graph.update(CONTOSO, "users", u1, displayName="Renamed")
    graph.delete(CONTOSO, "users", u2)  # soft
    graph.delete(CONTOSO, "users", u3, soft=False)
    graph.delete(CONTOSO, "users", u4)
    graph.restore(CONTOSO, "users", u4)
    graph.add(CONTOSO, "users", {"id": "new", "displayName": "New", "mail": "new@contoso.com"})
    graph.update(CONTOSO, "users", ids[5], officeLocation="Oslo")  # not selected: not a visible change

    minimal = client.walk(initial.delta_link, minimal=True)
    assert minimal.responses[0].headers["Preference-Applied"] == "return=minimal"
    assert minimal.latest() == {
        u0: {"id": u0, "jobTitle": "Director"},
        u1: {"id": u1, "mail": None, "displayName": "Renamed"},
        u2: {"id": u2, "@removed": {"reason": "changed"}},
        u3: {"id": u3, "@removed": {"reason": "deleted"}},
        u4: {"id": u4, "displayName": f"User {u4}", "mail": f"{u4}@contoso.com", "jobTitle": "Engineer"},
        "new": {"id": "new", "displayName": "New", "mail": "new@contoso.com", "jobTitle": None},
    }
    assert minimal.delta_link is not None

    # The same deltaLink without Prefer: full (selected) objects for updates.
    full = client.walk(initial.delta_link).latest()
    assert full[u0] == {"id": u0, "displayName": f"User {u0}", "mail": f"{u0}@contoso.com", "jobTitle": "Director"}
    assert full[u1] == {"id": u1, "displayName": "Renamed", "mail": None, "jobTitle": "Engineer"}

    # Nothing changed since: one empty page with a new deltaLink.
    quiet = client.walk(minimal.delta_link)
    assert quiet.pages == [[]]
    assert quiet.delta_link is not None

    # A soft-deleted object can still be purged: that is a permanent deletion.
    graph.delete(CONTOSO, "users", u2, soft=False)
    assert client.walk(quiet.delta_link).records == [{"id": u2, "@removed": {"reason": "deleted"}}]


def test_changes_made_during_a_round_arrive_in_the_next_one(graph: FakeGraph, client: Client) -> None:
    ids = add_users(graph, 10)
    graph.page_size = 5
    first = client.get(f"/v1.0/users/delta?$select={USER_SELECT}").json()
    graph.update(CONTOSO, "users", ids[0], jobTitle="CEO")  # already delivered on page 1
    rest = client.walk(first["@odata.nextLink"])
    assert rest.delta_link is not None
    assert client.walk(rest.delta_link, minimal=True).records == [{"id": ids[0], "jobTitle": "CEO"}]


def test_deltatoken_latest_skips_the_enumeration(graph: FakeGraph, client: Client) -> None:
    add_users(graph, 5)
    walk = client.walk("/v1.0/users/delta?$deltatoken=latest&$select=displayName")
    assert walk.pages == [[]]
    assert walk.delta_link is not None
    graph.add(CONTOSO, "users", {"id": "late", "displayName": "Late"})
    assert client.walk(walk.delta_link).records == [{"id": "late", "displayName": "Late"}]


def test_group_delta_carries_full_membership_then_membership_changes(graph: FakeGraph, client: Client) -> None:
    graph.add(CONTOSO, "groups", {"id": "g1", "displayName": "One", "members": ["a", "b", "c"]})
    graph.add(CONTOSO, "groups", {"id": "g2", "displayName": "Two"})
    initial = client.walk("/v1.0/groups/delta?$select=displayName,members")
    records = initial.latest()
    assert member_ids(records["g1"]) == ({"a", "b", "c"}, set())
    assert records["g2"]["members@delta"] == []
    assert records["g1"]["displayName"] == "One"

    graph.add_members(CONTOSO, "g1", ["d"])
    graph.remove_members(CONTOSO, "g1", ["a"])
    graph.add_members(CONTOSO, "g1", ["b"])  # already a member: no change
    changes = client.walk(initial.delta_link, minimal=True)
    assert len(changes.records) == 1
    record = changes.records[0]
    assert set(record) == {"id", "members@delta"}
    assert member_ids(record) == ({"d"}, {"a"})

    # Without Prefer the group's properties come along, membership is still only the change.
    full = client.walk(initial.delta_link).records[0]
    assert full["displayName"] == "One"
    assert member_ids(full) == ({"d"}, {"a"})

    # A restored group brings its whole membership back.
    graph.delete(CONTOSO, "groups", "g1")
    after_delete = client.walk(changes.delta_link)
    assert after_delete.records == [{"id": "g1", "@removed": {"reason": "changed"}}]
    graph.restore(CONTOSO, "groups", "g1")
    restored = client.walk(after_delete.delta_link, minimal=True).records
    assert len(restored) == 1
    assert restored[0]["displayName"] == "One"
    assert member_ids(restored[0]) == ({"b", "c", "d"}, set())


def test_groups_without_members_selected_have_no_members_delta(graph: FakeGraph, client: Client) -> None:
    graph.add(CONTOSO, "groups", {"id": "g1", "displayName": "One", "members": ["a"]})
    initial = client.walk("/v1.0/groups/delta?$select=displayName")
    assert initial.records == [{"id": "g1", "displayName": "One"}]
    graph.add_members(CONTOSO, "g1", ["b"])
    assert client.walk(initial.delta_link).records == []
    listing = client.walk("/v1.0/groups?$expand=members").records
    assert listing[0]["members"] == [{"@odata.type": "#microsoft.graph.user", "id": m} for m in ("a", "b")]


# -- knobs ---------------------------------------------------------------------------------


def test_members_chunk_splits_a_group_over_several_records_and_pages(graph: FakeGraph, client: Client) -> None:
    members = [f"m{n}" for n in range(7)]
    graph.add(CONTOSO, "groups", {"id": "big", "displayName": "Big", "members": members})
    for n in range(4):
        graph.add(CONTOSO, "groups", {"id": f"g{n}", "displayName": f"G{n}", "members": ["x"]})
    graph.page_size = 3
    graph.members_chunk = 3
    walk = client.walk("/v1.0/groups/delta?$select=displayName,members")

    big = [(page_no, r) for page_no, page in enumerate(walk.pages) for r in page if r["id"] == "big"]
    assert [len(r["members@delta"]) for _, r in big] == [3, 3, 1]
    assert len({page_no for page_no, _ in big}) > 1
    assert set().union(*(member_ids(r)[0] for _, r in big)) == set(members)
    assert all(r["displayName"] == "Big" for _, r in big)

    graph.add_members(CONTOSO, "big", ["n1", "n2", "n3", "n4"])
    graph.remove_members(CONTOSO, "big", ["m0"])
    changes = [r for r in client.walk(walk.delta_link, minimal=True).records if r["id"] == "big"]
    assert [len(r["members@delta"]) for r in changes] == [3, 2]
    added = set().union(*(member_ids(r)[0] for r in changes))
    removed = set().union(*(member_ids(r)[1] for r in changes))
    assert (added, removed) == ({"n1", "n2", "n3", "n4"}, {"m0"})


def test_duplicate_records_repeat_records_on_later_pages(graph: FakeGraph, client: Client) -> None:
    ids = add_users(graph, 20)
    graph.page_size = 6
    graph.duplicate_records = True
    walk = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}")
    seen = [r["id"] for r in walk.records]
    assert len(seen) > len(ids)
    assert set(seen) == set(ids)
    first_page_ids = {r["id"] for r in walk.pages[0]}
    assert any(r["id"] in first_page_ids for page in walk.pages[1:] for r in page)

    graph.update(CONTOSO, "users", ids[0], jobTitle="Boss")
    graph.update(CONTOSO, "users", ids[1], jobTitle="Boss")
    changes = client.walk(walk.delta_link, minimal=True)
    assert [r["id"] for r in changes.records] == [ids[0], ids[1], ids[0]]
    assert changes.latest()[ids[0]] == {"id": ids[0], "jobTitle": "Boss"}


def test_duplicate_copies_are_never_older_than_the_first(graph: FakeGraph, client: Client) -> None:
    ids = add_users(graph, 8)
    graph.page_size = 4
    graph.duplicate_records = True
    first = client.get(f"/v1.0/users/delta?$select={USER_SELECT}").json()
    graph.update(CONTOSO, "users", ids[0], jobTitle="Changed meanwhile")
    rest = client.walk(first["@odata.nextLink"])
    copies = [r for r in rest.records if r["id"] == ids[0]]
    assert copies
    assert copies[-1]["jobTitle"] == "Changed meanwhile"


def test_empty_pages_still_carry_next_links(graph: FakeGraph, client: Client) -> None:
    ids = add_users(graph, 7)
    graph.page_size = 3
    graph.empty_pages = True
    walk = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}")
    assert [len(p) for p in walk.pages] == [0, 3, 0, 3, 0, 1]
    assert sorted(walk.latest()) == ids
    assert walk.delta_link is not None
    assert "@odata.nextLink" in walk.responses[0].json()
    quiet = client.walk(walk.delta_link)
    assert quiet.pages == [[], []]
    assert quiet.delta_link is not None


def test_slow_pages_delay_each_page(graph: FakeGraph, client: Client) -> None:
    add_users(graph, 3)
    graph.slow_pages = 0.3
    started = time.monotonic()
    assert client.get("/v1.0/users").status_code == 200
    assert time.monotonic() - started >= 0.3


# -- failures ------------------------------------------------------------------------------


def test_expired_delta_tokens_answer_410_with_a_fresh_start(graph: FakeGraph, client: Client) -> None:
    add_users(graph, 10)
    graph.page_size = 4
    first = client.get(f"/v1.0/users/delta?$select={USER_SELECT}").json()
    walk = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}")
    graph.expire_delta_tokens()

    for stale in (walk.delta_link, first["@odata.nextLink"]):
        assert stale is not None
        response = client.get(stale)
        assert response.status_code == 410
        assert response.json()["error"]["code"] == "syncStateNotFound"
        location = response.headers["Location"]
        assert location == f"{graph.base_url}/v1.0/users/delta?$select={USER_SELECT}"
    restarted = client.walk(location)
    assert len(restarted.latest()) == 10

    graph.expire_delta_tokens(status=400)
    assert restarted.delta_link is not None
    response = client.get(restarted.delta_link)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "syncStateNotFound"

    garbage = client.get("/v1.0/users/delta?$deltatoken=not-a-token")
    assert garbage.status_code == 400
    assert "Location" in garbage.headers


def test_throttling_answers_429_with_retry_after(graph: FakeGraph, client: Client) -> None:
    add_users(graph, 1)
    graph.throttle_next(2)
    for _ in range(2):
        response = client.get("/v1.0/users")
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "2"
        error = response.json()["error"]
        assert error["code"] == "TooManyRequests"
        assert error["message"]
        assert error["innerError"]["request-id"] == response.headers["request-id"]
        assert "date" in error["innerError"]
    assert client.get("/v1.0/users").status_code == 200

    graph.throttle_next(1, status=503, retry_after="7")
    response = client.get("/v1.0/users")
    assert (response.status_code, response.headers["Retry-After"]) == (503, "7")


def test_fail_next_serves_the_given_status_and_body(graph: FakeGraph, client: Client) -> None:
    graph.fail_next(1, status=500, body=b'{"error": {"code": "generalException", "message": "boom"}}')
    response = client.get("/v1.0/users")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "generalException"
    assert client.get("/v1.0/users").status_code == 200


def test_faults_can_target_one_tenant(graph: FakeGraph, fake_entra: FakeEntra) -> None:
    contoso = Client(graph, get_token(fake_entra, CONTOSO))
    fabrikam = Client(graph, get_token(fake_entra, FABRIKAM))
    graph.throttle_next(1, tenant=FABRIKAM)
    assert contoso.get("/v1.0/users").status_code == 200
    assert fabrikam.get("/v1.0/users").status_code == 429
    assert fabrikam.get("/v1.0/users").status_code == 200


def test_latency_delays_every_request_and_concurrency_is_recorded_per_tenant(
    graph: FakeGraph, fake_entra: FakeEntra
) -> None:
    contoso = Client(graph, get_token(fake_entra, CONTOSO))
    fabrikam = Client(graph, get_token(fake_entra, FABRIKAM))
    graph.latency_seconds = 0.3
    started = time.monotonic()
    calls = [threading.Thread(target=contoso.get, args=("/v1.0/users",)) for _ in range(3)]
    calls.append(threading.Thread(target=fabrikam.get, args=("/v1.0/users",)))
    for call in calls:
        call.start()
    for call in calls:
        call.join()
    assert time.monotonic() - started >= 0.3, "each answered after the latency"  # together: counted below
    assert graph.max_concurrent_requests(CONTOSO) == 3
    assert graph.max_concurrent_requests(FABRIKAM) == 1
    assert graph.max_concurrent_requests() == 4
    graph.reset_records()
    assert graph.max_concurrent_requests() == 0


def test_a_storm_answers_429_for_that_tenant_until_it_passes(graph: FakeGraph, fake_entra: FakeEntra) -> None:
    contoso = Client(graph, get_token(fake_entra, CONTOSO))
    fabrikam = Client(graph, get_token(fake_entra, FABRIKAM))
    storm = 2.0  # four local requests fit in it on a loaded machine too
    ends = time.monotonic() + storm
    graph.throttle_for(FABRIKAM, storm, retry_after="60")
    for _ in range(3):
        response = fabrikam.get("/v1.0/users")
        assert (response.status_code, response.headers["Retry-After"]) == (429, "60")
    assert contoso.get("/v1.0/users").status_code == 200
    time.sleep(max(0.0, ends - time.monotonic() + 0.1))
    assert fabrikam.get("/v1.0/users").status_code == 200


def test_a_hang_holds_that_tenant_only_and_ends_when_the_fake_stops(graph: FakeGraph, fake_entra: FakeEntra) -> None:
    contoso = Client(graph, get_token(fake_entra, CONTOSO))
    fabrikam = Client(graph, get_token(fake_entra, FABRIKAM))
    started = time.monotonic()
    graph.hang(FABRIKAM, 1.5)
    answers: list[int] = []
    held = threading.Thread(target=lambda: answers.append(fabrikam.get("/v1.0/users").status_code))
    held.start()
    assert contoso.get("/v1.0/users").status_code == 200
    assert held.is_alive(), "the other tenant is answered while this one's request is held"
    held.join(timeout=10)
    assert answers == [200] and time.monotonic() - started >= 1.5
    graph.hang(FABRIKAM, 60)
    stuck = threading.Thread(target=lambda: fabrikam.get("/v1.0/users"))
    stuck.start()
    time.sleep(0.2)
    started = time.monotonic()
    graph.stop()
    stuck.join(timeout=10)
    assert time.monotonic() - started < 5, "stop() must not wait out a hang"


def test_tokens_entra_did_not_issue_or_revoked_get_401(graph: FakeGraph, client: Client, fake_entra: FakeEntra) -> None:
    assert client.get("/v1.0/users").status_code == 200
    fake_entra.revoke(client.token)
    for response in (client.get("/v1.0/users"), Client(graph, "made-up").get("/v1.0/users")):
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "InvalidAuthenticationToken"
        assert error["message"] == "Access token has expired or is not yet valid."
    anonymous = requests.get(f"{graph.base_url}/v1.0/users", timeout=10)
    assert anonymous.status_code == 401


def test_expired_tokens_get_401(graph: FakeGraph, fake_entra: FakeEntra) -> None:
    fake_entra.expires_in = 1
    client = Client(graph, get_token(fake_entra))
    assert client.get("/v1.0/users").status_code == 200
    time.sleep(1.1)
    assert client.get("/v1.0/users").status_code == 401


def test_deny_answers_403_for_that_tenant_and_resource_only(graph: FakeGraph, client: Client) -> None:
    graph.deny(CONTOSO, "groups")
    for path in ("/v1.0/groups", "/v1.0/groups/delta"):
        response = client.get(path)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "Authorization_RequestDenied"
        assert response.json()["error"]["message"] == "Insufficient privileges to complete the operation."
    assert client.get("/v1.0/users").status_code == 200
    graph.allow(CONTOSO, "groups")
    assert client.get("/v1.0/groups").status_code == 200


# -- tenants, truth, records -----------------------------------------------------------------


def test_each_token_sees_its_own_tenant(graph: FakeGraph, fake_entra: FakeEntra) -> None:
    add_users(graph, 3, CONTOSO, prefix="c")
    add_users(graph, 2, FABRIKAM, prefix="f")
    contoso = Client(graph, get_token(fake_entra, CONTOSO))
    fabrikam = Client(graph, get_token(fake_entra, FABRIKAM))
    assert sorted(contoso.walk("/v1.0/users").latest()) == ["c00000", "c00001", "c00002"]
    assert sorted(fabrikam.walk("/v1.0/users").latest()) == ["f00000", "f00001"]

    # A delta token of one tenant is no good in another.
    link = contoso.walk("/v1.0/users/delta").delta_link
    assert link is not None
    assert fabrikam.get(link).status_code == 410
    assert {r.tenant for r in graph.requests} == {CONTOSO, FABRIKAM}


def test_objects_reflect_the_truth(graph: FakeGraph) -> None:
    graph.add(CONTOSO, "users", {"id": "a", "displayName": "A", "mail": "a@x"})
    graph.add(CONTOSO, "users", {"id": "b", "displayName": "B"})
    graph.add(CONTOSO, "groups", {"id": "g", "displayName": "G", "members": ["b", "a"]})
    graph.update(CONTOSO, "users", "a", mail=None)
    graph.delete(CONTOSO, "users", "b")
    graph.remove_members(CONTOSO, "g", ["b"])
    graph.add_members(CONTOSO, "g", ["c"])
    assert graph.objects(CONTOSO, "users") == {"a": {"id": "a", "displayName": "A", "mail": None}}
    assert graph.objects(CONTOSO, "groups") == {"g": {"id": "g", "displayName": "G", "members": ["a", "c"]}}
    assert list(graph.soft_deleted(CONTOSO, "users")) == ["b"]
    assert graph.objects(FABRIKAM, "users") == {}
    with pytest.raises(KeyError):
        graph.update(CONTOSO, "users", "b", displayName="deleted users cannot change")
    with pytest.raises(ValueError):
        graph.add(CONTOSO, "users", {"id": "b"})


def test_silent_changes_are_invisible_to_delta_but_not_to_a_full_read(graph: FakeGraph, client: Client) -> None:
    ids = add_users(graph, 3)
    initial = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}")
    graph.silently_change(CONTOSO, "users", ids[0], jobTitle="Ghost")
    assert client.walk(initial.delta_link).records == []
    assert graph.objects(CONTOSO, "users")[ids[0]]["jobTitle"] == "Ghost"
    assert client.walk("/v1.0/users?$select=jobTitle").latest()[ids[0]]["jobTitle"] == "Ghost"
    assert client.walk(f"/v1.0/users/delta?$select={USER_SELECT}").latest()[ids[0]]["jobTitle"] == "Ghost"


def test_user_delta_with_expand_manager_reports_manager_delta_set_changed_and_removed(
    graph: FakeGraph, client: Client
) -> None:
    ids = add_users(graph, 4)
    graph.set_manager(CONTOSO, ids[1], ids[0])
    manager = {"@odata.type": "#microsoft.graph.user", "id": ids[0]}
    initial = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}&$expand=manager")
    records = initial.latest()
    assert records[ids[1]]["manager@delta"] == [manager]
    assert "manager@delta" not in records[ids[2]], "a user without a manager carries no annotation"
    assert all("manager" not in record for record in initial.records)

    graph.set_manager(CONTOSO, ids[2], ids[0])  # set
    graph.set_manager(CONTOSO, ids[1], ids[3])  # changed
    changes = client.walk(initial.delta_link, minimal=True)
    assert sorted(changes.records, key=lambda r: r["id"]) == [
        {"id": ids[1], "manager@delta": [{"@odata.type": "#microsoft.graph.user", "id": ids[3]}]},
        {"id": ids[2], "manager@delta": [manager]},
    ]

    graph.set_manager(CONTOSO, ids[2], None)  # removed: the old manager, marked @removed
    graph.update(CONTOSO, "users", ids[3], jobTitle="Boss")
    removed = client.walk(changes.delta_link, minimal=True).latest()
    assert removed[ids[2]] == {"id": ids[2], "manager@delta": [{**manager, "@removed": {"reason": "deleted"}}]}
    assert removed[ids[3]] == {"id": ids[3], "jobTitle": "Boss"}, "no manager change, no annotation"
    assert graph.managers(CONTOSO) == {ids[1]: ids[3]}

    # Without the link asked for, manager changes are invisible to delta.
    plain = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}")
    graph.set_manager(CONTOSO, ids[0], ids[3])
    assert client.walk(plain.delta_link).records == []


def test_delta_expand_of_an_untracked_link_is_a_400(graph: FakeGraph, client: Client) -> None:
    add_users(graph, 1)
    for url in ("/v1.0/users/delta?$expand=memberOf", "/v1.0/groups/delta?$expand=manager"):
        response = client.get(url)
        assert response.status_code == 400 and response.json()["error"]["code"] == "Request_UnsupportedQuery"
    assert client.get("/v1.0/groups/delta?$expand=members").status_code == 200


def test_silently_added_deleted_and_unlinked_objects_escape_delta_but_not_a_full_read(
    graph: FakeGraph, client: Client
) -> None:
    ids = add_users(graph, 3)
    graph.add(CONTOSO, "groups", {"id": "g1", "displayName": "One", "members": ids[:2]})
    users = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}")
    groups = client.walk("/v1.0/groups/delta?$select=displayName,members")

    graph.add(CONTOSO, "users", {"id": "ghost", "displayName": "Ghost"}, silently=True)
    graph.delete(CONTOSO, "users", ids[2], silently=True)
    graph.remove_members(CONTOSO, "g1", [ids[0]], silently=True)
    graph.add_members(CONTOSO, "g1", [ids[2]], silently=True)

    assert client.walk(users.delta_link).records == []
    assert client.walk(groups.delta_link).records == []
    fresh_users = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}").latest()
    assert "ghost" in fresh_users and ids[2] not in fresh_users
    fresh_group = client.walk("/v1.0/groups/delta?$select=displayName,members").latest()["g1"]
    assert member_ids(fresh_group) == ({ids[1], ids[2]}, set())


def sign_ins(count: int, start: str = "2026-05-01T10:00:00", prefix: str = "s") -> list[dict[str, Any]]:
    """``count`` sign-ins one minute apart from ``start`` (UTC), with Graph's 7-digit fractions."""
    first = datetime.fromisoformat(start)
    return [
        {
            "id": f"{prefix}{n:04d}",
            "createdDateTime": (first + timedelta(minutes=n)).strftime("%Y-%m-%dT%H:%M:%S.1234567Z"),
        }
        for n in range(count)
    ]


def test_sign_in_log_is_filtered_by_time_and_served_newest_first_in_pages(graph: FakeGraph, client: Client) -> None:
    graph.add_log_records(CONTOSO, "auditLogs/signIns", sign_ins(30))
    graph.page_size = 7
    window = "createdDateTime ge 2026-05-01T10:05:00Z and createdDateTime le 2026-05-01T10:24:59Z"
    walk = client.walk(f"/v1.0/auditLogs/signIns?$filter={window}")
    assert [record["id"] for record in walk.records] == [f"s{n:04d}" for n in range(24, 4, -1)]
    assert [len(page) for page in walk.pages] == [7, 7, 6] and walk.delta_link is None
    assert [len(page) for page in client.walk("/v1.0/auditLogs/signIns?$top=25").pages] == [25, 5]

    # A late arrival: an old timestamp, appended later, shows up in every query that covers it.
    graph.add_log_records(CONTOSO, "auditLogs/signIns", sign_ins(1, "2026-05-01T10:05:30", prefix="late"))
    late = client.walk("/v1.0/auditLogs/signIns?$filter=createdDateTime ge 2026-05-01T10:05:00Z").records
    assert [record["id"] for record in late][-2:] == ["late0000", "s0005"]

    for bad in (
        "activityDateTime ge 2026-05-01T10:00:00Z",
        "createdDateTime ge yesterday",
        "startsWith(x,'a')",
        "createdDateTime gt 2026-05-01T10:00:00Z",  # sign-ins document eq, ge and le only
    ):
        response = client.get(f"/v1.0/auditLogs/signIns?$filter={bad}")
        assert response.status_code == 400, bad
    assert client.get("/v1.0/auditLogs/signIns/delta").status_code != 200, "logs have no delta"


def test_each_log_takes_only_the_filter_operators_and_order_its_page_documents(
    graph: FakeGraph, client: Client
) -> None:
    records = [
        {"id": "p1", "activityDateTime": "2026-05-01T10:00:00.1234563Z", "jobId": "j"},
        {"id": "p2", "activityDateTime": "2026-05-01T10:00:00.1234567Z", "jobId": "j"},
        {"id": "p3", "activityDateTime": "2026-05-01T10:00:01Z", "jobId": "j"},
    ]
    graph.add_log_records(CONTOSO, "auditLogs/provisioning", records)
    provisioning = "/v1.0/auditLogs/provisioning"
    assert client.get(f"{provisioning}?$filter=activityDateTime ge 2026-05-01T10:00:00Z").status_code == 400
    # gt/lt only, compared to the 100-ns tick: p1 and p2 lie in the same microsecond
    window = "activityDateTime gt 2026-05-01T10:00:00.1234562Z and activityDateTime lt 2026-05-01T10:00:00.1234567Z"
    assert [r["id"] for r in client.walk(f"{provisioning}?$filter={window}").records] == ["p1"]
    # no documented order: oldest first unless asked
    assert [r["id"] for r in client.walk(provisioning).records] == ["p1", "p2", "p3"]
    newest_first = client.walk(f"{provisioning}?$orderby=activityDateTime desc&$select=jobId").records
    assert newest_first == [{"id": "p3", "jobId": "j"}, {"id": "p2", "jobId": "j"}, {"id": "p1", "jobId": "j"}]
    assert client.get(f"{provisioning}?$orderby=jobId").status_code == 400


def test_reports_limit_answers_429_with_retry_after_until_the_window_frees(graph: FakeGraph, client: Client) -> None:
    graph.add_log_records(
        CONTOSO, "auditLogs/directoryAudits", [{"id": "a1", "activityDateTime": "2026-05-01T10:00:00Z"}]
    )
    graph.reports_limit = (2, 1.5)
    assert [client.get("/v1.0/auditLogs/directoryAudits").status_code for _ in range(2)] == [200, 200]
    refused = client.get("/v1.0/auditLogs/directoryAudits")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "TooManyRequests"
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    assert client.get("/v1.0/users").status_code == 200, "the directory's limits are not the reports'"
    time.sleep(1.6)
    assert client.get("/v1.0/auditLogs/directoryAudits").status_code == 200


def test_requests_are_recorded(graph: FakeGraph, client: Client) -> None:
    graph.reset_records()
    client.get("/v1.0/users?$select=displayName&$top=5", minimal=True)
    client.get("/v1.0/nothing/here/at/all")
    first, second = graph.requests
    assert first.method == "GET"
    assert first.path == "/v1.0/users"
    assert first.query == {"$select": "displayName", "$top": "5"}
    assert first.headers["prefer"] == "return=minimal"
    assert first.headers["authorization"] == f"Bearer {client.token}"
    assert first.tenant == CONTOSO
    assert first.status == 200
    assert abs(first.time - time.time()) < 10
    assert second.status == 400
    graph.reset_records()
    assert graph.requests == []


# -- end to end: a client replaying delta converges on the truth ---------------------------------


class Replica:
    """What a correct delta consumer keeps: users and groups (with members) by id."""

    def __init__(self, client: Client, minimal: bool) -> None:
        self.client = client
        self.minimal = minimal
        self.data: dict[str, dict[str, dict[str, Any]]] = {"users": {}, "groups": {}}
        self.links = {
            "users": f"/v1.0/users/delta?$select={USER_SELECT},userPrincipalName",
            "groups": "/v1.0/groups/delta?$select=displayName,members",
        }

    def sync(self) -> None:
        for resource, link in self.links.items():
            walk = self.client.walk(link, minimal=self.minimal)
            store = self.data[resource]
            for record in walk.records:
                if "@removed" in record:
                    store.pop(record["id"], None)
                    continue
                current = store.setdefault(record["id"], {"id": record["id"]})
                if resource == "groups":
                    members = set(current.get("members", []))
                    added, removed = member_ids(record)
                    current["members"] = sorted((members | added) - removed)
                current.update({k: v for k, v in record.items() if k != "members@delta"})
            assert walk.delta_link is not None
            self.links[resource] = walk.delta_link


def truth(graph: FakeGraph) -> dict[str, dict[str, dict[str, Any]]]:
    users = {
        oid: {k: obj.get(k) for k in ("id", "displayName", "mail", "jobTitle", "userPrincipalName")}
        for oid, obj in graph.objects(CONTOSO, "users").items()
    }
    groups = {
        oid: {"id": oid, "displayName": obj["displayName"], "members": obj["members"]}
        for oid, obj in graph.objects(CONTOSO, "groups").items()
    }
    return {"users": users, "groups": groups}


@pytest.mark.parametrize("minimal", [True, False])
def test_replaying_delta_converges_on_the_truth_under_every_knob(
    graph: FakeGraph, client: Client, minimal: bool
) -> None:
    populate(graph, CONTOSO, users=300, groups=25, seed=1)
    graph.page_size = 40
    graph.duplicate_records = True
    graph.empty_pages = True
    graph.members_chunk = 4
    replica = Replica(client, minimal)
    replica.sync()
    assert replica.data == truth(graph)

    rng = random.Random(7)
    for _ in range(6):
        done = mutate(graph, CONTOSO, rng, changes=30)
        assert len(done) == 30
        replica.sync()
        assert replica.data == truth(graph)


def test_concurrent_mutation_during_rounds_still_converges(graph: FakeGraph, client: Client) -> None:
    populate(graph, CONTOSO, users=200, groups=10, seed=3)
    graph.page_size = 20
    graph.slow_pages = 0.01
    replica = Replica(client, minimal=True)
    stop = threading.Event()

    def churn() -> None:
        rng = random.Random(11)
        while not stop.is_set():
            mutate(graph, CONTOSO, rng, changes=3)
            time.sleep(0.005)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(3):
            replica.sync()
    finally:
        stop.set()
        thread.join()
    replica.sync()
    assert replica.data == truth(graph)


def test_populate_is_realistic_and_reproducible(graph: FakeGraph, ca: trustme.CA, fake_entra: FakeEntra) -> None:
    populate(graph, CONTOSO, users=50, groups=5, seed=42)
    users = graph.objects(CONTOSO, "users")
    assert len(users) == 50
    for user in users.values():
        assert uuid.UUID(user["id"])
        assert user["mail"] == user["userPrincipalName"]
        assert user["mail"].endswith("@contoso.onmicrosoft.com")
        assert {"displayName", "jobTitle"} <= set(user)
    groups = graph.objects(CONTOSO, "groups")
    assert len(groups) == 5
    assert all(set(g["members"]) <= set(users) for g in groups.values())

    with FakeGraph(ca, fake_entra) as other:
        populate(other, CONTOSO, users=50, groups=5, seed=42)
        assert other.objects(CONTOSO, "users") == users
        assert other.objects(CONTOSO, "groups") == groups


def test_paging_100k_users_at_999_is_fast(graph: FakeGraph, client: Client) -> None:
    populate(graph, CONTOSO, users=100_000, groups=0)
    started = time.monotonic()
    walk = client.walk(f"/v1.0/users?$select={USER_SELECT}&$top=999")
    listing = time.monotonic() - started
    assert len(walk.pages) == 101
    assert len(walk.latest()) == 100_000

    graph.page_size = 999
    started = time.monotonic()
    delta = client.walk(f"/v1.0/users/delta?$select={USER_SELECT}")
    enumeration = time.monotonic() - started
    assert len(delta.latest()) == 100_000
    assert listing < 30
    assert enumeration < 30


def test_stopped_fake_refuses_connections(graph: FakeGraph, client: Client) -> None:
    graph.stop()
    with pytest.raises(requests.ConnectionError):
        client.get("/v1.0/users")
    graph.start()
    assert client.get("/v1.0/users").status_code == 200


def test_links_are_opaque_query_tokens(graph: FakeGraph, client: Client) -> None:
    add_users(graph, 5)
    graph.page_size = 2
    body = client.get("/v1.0/groups/delta?$select=displayName").json()
    assert body["@odata.deltaLink"]
    body = client.get("/v1.0/users/delta?$select=displayName").json()
    query = parse_qs(urlsplit(body["@odata.nextLink"]).query)
    assert list(query) == ["$skiptoken"]
