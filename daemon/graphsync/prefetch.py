"""Fetch the next page while the caller works on the current one: a round costs max(paging, processing) per page
instead of their sum, when Graph takes 0.3-1 s to answer each page.

One page ahead, never more: the thread fetches page k+1 only once the caller has taken page k, so memory holds
two pages at most whatever the collection's size. What the source raises reaches the caller at the place it
happened, after the pages before it, so a bad page fails the round exactly as without read-ahead.

The thread is a daemon thread: a process that exits (a stop that outlasted its grace) does not wait for it. When
the caller stops early (an error, a stop), the thread asks for no further item; a call already in flight ends on
its own (its timeout and retries bound it, a ``Retry-After`` included), its page is dropped, and the connection goes
back to the session's pool with the response read whole. The source is closed on the thread that ran it, as a
generator requires.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

POLL_SECONDS = 0.2  # how often a caller waiting for a page looks at ``interrupted``


class StoppedWaiting(Exception):
    """``interrupted()`` became true while the caller waited for the next item: the items end incomplete."""


class _End:
    """The source is exhausted."""


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Fetcher(Generic[T]):
    """The thread's side: take the next item of ``source`` each time the caller asks, hand it over, repeat."""

    def __init__(self, source: Iterator[T], name: str) -> None:
        self.source = source
        self.wanted = threading.Semaphore(1)  # the first item is wanted at once
        self.ready: queue.SimpleQueue[T | _End | _Failed] = queue.SimpleQueue()
        self.abandoned = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            while True:
                self.wanted.acquire()
                if self.abandoned.is_set():
                    return
                try:
                    item = next(self.source)
                except StopIteration:
                    self.ready.put(_End())
                    return
                except BaseException as exc:  # the caller re-raises it in order
                    self.ready.put(_Failed(exc))
                    return
                self.ready.put(item)
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                close()

    def abandon(self) -> None:
        self.abandoned.set()
        self.wanted.release()  # wake the thread if it waits for a request, so it sees it is abandoned


def read_ahead(
    source: Iterable[T], *, interrupted: Callable[[], bool] = lambda: False, name: str = "read-ahead"
) -> Generator[T, None, None]:
    """Yield ``source``'s items in order while its next item is being taken on a thread.

    ``interrupted`` is polled while the caller waits for an item (say, Graph holds a page): once true, the wait
    ends with :class:`StoppedWaiting` instead of lasting until the page comes.
    """
    fetcher = _Fetcher(iter(source), name)
    fetcher.thread.start()
    try:
        while True:
            item = _next(fetcher, interrupted)
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            fetcher.wanted.release()  # fetch the next one while the caller works on this one
            yield item
    finally:
        fetcher.abandon()


def _next(fetcher: _Fetcher[T], interrupted: Callable[[], bool]) -> T | _End | _Failed:
    while True:
        try:
            return fetcher.ready.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if interrupted():
                raise StoppedWaiting("stopped while the next page was being fetched") from None
