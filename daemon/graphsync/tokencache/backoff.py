"""Bounded exponential backoff, for the cache's two unreliable neighbours: storage and the identity provider."""

from __future__ import annotations

from collections.abc import Callable


class Backoff:
    """After each failure wait twice as long as after the previous one, up to ``maximum``; a success resets it.

    Runs on a monotonic clock. ``jitter`` spreads each wait by up to that fraction either way (drawn with
    ``uniform``), so replicas that failed together do not all come back in the same instant.
    """

    def __init__(
        self,
        *,
        initial: float,
        maximum: float,
        monotonic: Callable[[], float],
        jitter: float = 0.0,
        uniform: Callable[[float, float], float] | None = None,
    ) -> None:
        if jitter and uniform is None:
            raise ValueError("a jittered backoff needs a uniform random source")
        self._initial = initial
        self._maximum = maximum
        self._monotonic = monotonic
        self._jitter = jitter
        self._uniform = uniform
        self._delay = initial
        self._retry_at = 0.0

    def ready(self) -> bool:
        """Whether the next attempt is due (always, until something failed)."""
        return self._monotonic() >= self._retry_at

    def remaining(self) -> float:
        """Seconds until the next attempt is due; 0 when it is due now."""
        return max(0.0, self._retry_at - self._monotonic())

    def failed(self) -> None:
        """Hold attempts off for the current delay, counted from now (the failed call itself took time)."""
        delay = self._delay
        if self._jitter and self._uniform is not None:
            delay *= self._uniform(1 - self._jitter, 1 + self._jitter)
        self._retry_at = self._monotonic() + delay
        self._delay = min(self._delay * 2, self._maximum)

    def succeeded(self) -> None:
        """Back to the initial delay, and nothing to wait for."""
        self._delay = self._initial
        self._retry_at = 0.0
