"""Single flight inside one process: of the threads that miss the same token together, one asks for it.

MSAL has none (each thread that misses calls the identity provider). The fleet lease cannot provide it either: a
lease held by this very process looks, to its other threads, like any other holder's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from graphsync.tokencache.shared import Turn


@dataclass
class Flight:
    """One thread's refresh of one token: ended when the token lands, or when ``deadline`` passes without it."""

    landed: Callable[[], bool]
    deadline: float
    thread: threading.Thread = field(default_factory=threading.current_thread)
    turn: Turn | None = None


class Flights:
    """The refreshes under way in this process, one per token key; waiters sleep on a condition until it lands."""

    def __init__(self, *, bound: float, monotonic: Callable[[], float]) -> None:
        self._bound = bound
        self._monotonic = monotonic
        self._changed = threading.Condition()
        self._active: dict[str, Flight] = {}

    def board(self, key: str, *, landed: Callable[[], bool], working: Callable[[], bool]) -> Flight | None:
        """Lead the refresh of ``key`` (a :class:`Flight` to end later), or ``None`` when there is nothing to lead.

        ``None`` means the token landed (``landed()``), or another thread leads and the caller has a ``working``
        token to use meanwhile. A leader that stays silent past the bound is replaced by the next waiter, and so
        is a leader whose own thread asks again: its previous call failed, since no token landed.
        """
        ended: list[Flight] = []
        try:
            with self._changed:
                while not landed():
                    flight = self._active.get(key)
                    now = self._monotonic()
                    if flight is None or now >= flight.deadline or flight.thread is threading.current_thread():
                        if flight is not None:
                            ended.append(self._end(key))
                        self._active[key] = Flight(landed, now + self._bound)
                        return self._active[key]
                    if working():
                        return None
                    self._changed.wait(flight.deadline - now)
                return None
        finally:
            _give_back(ended)

    def hold(self, key: str, flight: Flight, turn: Turn) -> None:
        """The leader goes to the identity provider with ``turn``: it is given back when the flight ends."""
        with self._changed:
            if self._active.get(key) is flight:
                flight.turn = turn
                flight.deadline = self._monotonic() + self._bound  # waiting for the lease may have used the first
                return
        turn.release()  # the flight ended meanwhile (its token landed, or its bound passed)

    def land(self, key: str, flight: Flight) -> None:
        """The leader ends its flight without a refresh of its own (the token came from the blob)."""
        self._end_where(lambda k, f: k == key and f is flight)

    def check(self) -> None:
        """Memory changed: end every flight whose token is now there, and wake the threads waiting for it."""
        self._end_where(lambda _, f: f.landed())

    def expire(self, key: str, flight: Flight) -> None:
        """The bound has passed: if the flight is still under way its call failed; give its turn back."""
        self._end_where(lambda k, f: k == key and f is flight and self._monotonic() >= f.deadline)

    def _end_where(self, ends: Callable[[str, Flight], bool]) -> None:
        with self._changed:
            ended = [self._end(key) for key, flight in list(self._active.items()) if ends(key, flight)]
        _give_back(ended)

    def _end(self, key: str) -> Flight:
        self._changed.notify_all()
        return self._active.pop(key)


def _give_back(flights: list[Flight]) -> None:
    """Release the leases of ended flights, outside the condition: a release is a storage call."""
    for flight in flights:
        if flight.turn is not None:
            flight.turn.release()
