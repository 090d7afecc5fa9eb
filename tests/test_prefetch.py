"""graphsync.prefetch.read_ahead with real threads: one item ahead and never more, errors in order, an early stop
that leaves no thread working, an interruptible wait, and a thread that does not keep a process alive."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from graphsync.prefetch import POLL_SECONDS, StoppedWaiting, read_ahead
from tests.conftest import REPO_ROOT


class Source:
    """A generator's worth of items that records how far it was taken, and whether it was closed."""

    def __init__(self, items: int, *, fail_at: int | None = None, block_at: int | None = None) -> None:
        self.items, self.fail_at, self.block_at = items, fail_at, block_at
        self.taken = 0
        self.closed = threading.Event()
        self.release = threading.Event()
        self.threads: set[str] = set()

    def __iter__(self) -> Iterator[int]:
        try:
            for item in range(self.items):
                self.threads.add(threading.current_thread().name)
                if item == self.block_at:
                    self.release.wait(30)  # Graph holding a page
                if item == self.fail_at:
                    raise ValueError(f"item {item} is truncated")
                self.taken += 1
                yield item
        finally:
            self.closed.set()


def _wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_items_come_in_order_with_the_next_one_taken_meanwhile_and_never_two_ahead() -> None:
    source = Source(6)
    seen = []
    for item in read_ahead(source, name="pages test"):
        # While the caller works on item k, the thread takes item k+1 and then waits: never k+2.
        ahead = min(item + 2, 6)
        assert _wait_until(lambda ahead=ahead: source.taken >= ahead), f"item {item + 1} was not fetched ahead"
        time.sleep(0.05)
        assert source.taken == ahead
        seen.append(item)
    assert seen == list(range(6))
    assert source.threads == {"pages test"}, "the source runs on the read-ahead thread only"
    assert source.closed.is_set()


def test_an_error_reaches_the_caller_after_every_item_before_it() -> None:
    source = Source(6, fail_at=3)
    seen = []
    with pytest.raises(ValueError, match="item 3 is truncated"):
        for item in read_ahead(source):
            seen.append(item)
    assert seen == [0, 1, 2]
    assert source.closed.is_set()


def test_a_caller_that_stops_early_leaves_the_source_closed_and_takes_nothing_more() -> None:
    source = Source(100)
    items = read_ahead(source, name="early stop")
    for item in items:
        if item == 2:
            break
    items.close()
    assert source.closed.wait(5), "the source was not closed"
    assert not _wait_until(lambda: source.taken > 4, seconds=0.3)
    assert source.taken <= 4  # item 3 may have been fetched ahead; it is dropped
    assert _wait_until(lambda: not any(thread.name == "early stop" for thread in threading.enumerate()))


def test_waiting_for_a_held_item_ends_soon_after_interrupted_and_the_held_item_is_dropped() -> None:
    source = Source(5, block_at=2)
    stop = threading.Event()
    seen = []
    items = read_ahead(source, interrupted=stop.is_set, name="held")
    with pytest.raises(StoppedWaiting):
        for item in items:
            seen.append(item)
            if item == 1:
                stop.set()  # e.g. SIGTERM, while the thread waits for item 2
                started = time.monotonic()
    assert time.monotonic() - started < POLL_SECONDS * 10
    assert seen == [0, 1]
    source.release.set()  # Graph answers at last: the thread drops the item and ends
    assert source.closed.wait(5)
    assert source.taken == 3, "the held item was taken, and nothing after it"


@pytest.mark.integration
def test_a_thread_waiting_for_an_item_does_not_keep_the_process_alive() -> None:
    code = (
        "import threading\n"
        "from graphsync.prefetch import read_ahead\n"
        "def held():\n"
        "    yield 1\n"
        "    threading.Event().wait()\n"  # the next page never comes
        "    yield 2\n"
        "items = read_ahead(held())\n"
        "print(next(items), flush=True)\n"  # returns with the thread still waiting for item 2
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    assert time.monotonic() - started < 10
