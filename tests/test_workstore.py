"""Working stores on this host: where they live by default, one process at a time, damaged files rebuilt."""

from __future__ import annotations

import os
import time
from pathlib import Path

from graphsync.chunking import chunk_lines
from graphsync.config.models import default_work_directory
from graphsync.snapshot import SnapshotStore, StoreTag
from graphsync.workstore import THROWAWAY_PREFIX, WorkStores

TENANT, JOB = "contoso.onmicrosoft.com", "users"


def _fill(store: SnapshotStore, n: int = 500, version: str = '"v1"') -> None:
    with store.transaction():
        store.apply({"id": f"{i:05d}", "displayName": f"User {i}"} for i in range(n))
        store.set_tag(StoreTag(version, "q", 0), [c.ref for c in chunk_lines(store.entries())])


def test_the_default_work_directory_follows_systemd_then_xdg_then_home() -> None:
    assert default_work_directory({"STATE_DIRECTORY": "/var/lib/graphsync"}) == Path("/var/lib/graphsync/work")
    assert default_work_directory({"STATE_DIRECTORY": "/a:/b"}) == Path("/a/work")  # several StateDirectory=
    assert default_work_directory({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/graphsync/work")
    assert default_work_directory({"HOME": "/h"}) == Path("/h/.cache/graphsync/work")


def test_a_second_process_on_the_host_gets_a_throwaway_store_not_the_one_in_use(tmp_path: Path) -> None:
    stores = WorkStores(tmp_path)
    with stores.open(TENANT, JOB) as first:
        _fill(first)
        # flock locks belong to open file descriptions: a second open, even in this process, is refused like
        # another process's would be.
        with stores.open(TENANT, JOB) as second:
            assert second.path != first.path and second.count() == 0 and second.tag is None
            throwaway = second.path
        assert not throwaway.exists(), "the throwaway store is removed after its run"
        assert first.count() == 500
    with stores.open(TENANT, JOB) as again:
        assert again.path == stores.path(TENANT, JOB) and again.count() == 500


def test_a_store_tagged_with_the_published_version_and_query_is_warm_and_others_are_not(tmp_path: Path) -> None:
    stores = WorkStores(tmp_path)
    assert not stores.is_warm(TENANT, JOB, '"v1"', "q")
    with stores.open(TENANT, JOB) as store:
        _fill(store)
    assert stores.is_warm(TENANT, JOB, '"v1"', "q")
    assert not stores.is_warm(TENANT, JOB, '"v2"', "q") and not stores.is_warm(TENANT, JOB, None, "q")
    assert not stores.is_warm(TENANT, JOB, '"v1"', "another select"), "a changed select rebuilds the store"


def test_throwaway_stores_left_by_a_killed_process_are_swept_after_a_day(tmp_path: Path) -> None:
    stores = WorkStores(tmp_path)
    tenant_directory = tmp_path / TENANT
    old, recent = tenant_directory / f"{THROWAWAY_PREFIX}old", tenant_directory / f"{THROWAWAY_PREFIX}recent"
    for leftover in (old, recent):
        leftover.mkdir(parents=True)
        (leftover / "store.sqlite").write_bytes(b"x" * 100)
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    with stores.open(TENANT, JOB):
        pass
    assert not old.exists() and recent.exists(), "only what no live run can still use goes"


def test_a_truncated_store_opens_empty_and_untagged(tmp_path: Path) -> None:
    stores = WorkStores(tmp_path)
    with stores.open(TENANT, JOB) as store:
        _fill(store, n=5000)
    path = stores.path(TENANT, JOB)
    os.truncate(path, path.stat().st_size // 2)
    with stores.open(TENANT, JOB) as store:
        assert store.count() == 0 and store.tag is None


def test_a_store_overwritten_with_garbage_opens_empty_and_untagged(tmp_path: Path) -> None:
    stores = WorkStores(tmp_path)
    with stores.open(TENANT, JOB) as store:
        _fill(store)
    stores.path(TENANT, JOB).write_bytes(os.urandom(64 * 1024))
    with stores.open(TENANT, JOB) as store:
        assert store.count() == 0 and store.tag is None


def test_a_failed_round_leaves_the_store_as_tagged(tmp_path: Path) -> None:
    stores = WorkStores(tmp_path)
    with stores.open(TENANT, JOB) as store:
        _fill(store)
        try:
            with store.transaction():
                store.apply([{"id": "00001", "displayName": "changed"}, {"id": "99999", "displayName": "new"}])
                store.set_tag(StoreTag('"v2"', "q", 0))
                raise RuntimeError("the publish failed")
        except RuntimeError:
            pass
        assert store.tag == StoreTag('"v1"', "q", 0) and store.count() == 500
        assert b'"User 1"' in dict(store.entries("00001", "00001"))["00001"]
